"""Per-token log-probabilities and entropies for GRPO from hidden states, without logits.

GRPO (TRL) scores each completion token with log p(token) and the entropy of the policy's
next-token distribution at a sampling temperature T, computed from the full logits:
``selective_log_softmax(logits / T, ids)`` and ``entropy_from_logits(logits / T)``. With
crossent they come from the final hidden states and the LM head's weight, a chunk of rows at
a time (crossent.integrations.trl.token_logps_and_entropy, on crossent.linear_token_stats);
the (batch, completion, vocab) logits never exist. This script computes both ways for a small
random-init Llama, prints the largest differences (values and the gradient a GRPO-style loss
sends to the hidden states) and each way's peak resident memory.

    python examples/grpo_logprobs.py            # vocab 128256, hidden 256, 4 x 384 tokens
    python examples/grpo_logprobs.py --tiny     # seconds (what CI runs)
"""

from __future__ import annotations

import argparse

import torch
import transformers

from crossent.bench import memory
from crossent.integrations.trl import token_logps_and_entropy


def full_logits(hidden: torch.Tensor, head: torch.nn.Module, ids: torch.Tensor, t: float):  # type: ignore[no-untyped-def]
    """TRL's way: materialise the logits, divide by T, then log-softmax and entropy."""
    try:
        from trl.trainer.utils import entropy_from_logits, selective_log_softmax
    except ImportError:  # the same formulas
        def selective_log_softmax(lg, i):  # type: ignore[no-untyped-def]
            return torch.log_softmax(lg, -1).gather(-1, i[..., None])[..., 0]

        def entropy_from_logits(lg):  # type: ignore[no-untyped-def]
            lp = torch.log_softmax(lg, -1)
            return -(lp.exp() * lp).sum(-1)

    logits = head(hidden) / t
    return selective_log_softmax(logits, ids), entropy_from_logits(logits)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--completions", type=int, default=4)
    p.add_argument("--length", type=int, default=384)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--tiny", action="store_true", help="vocab 500, hidden 32, 3 x 12 tokens")
    a = p.parse_args()
    if a.tiny:
        a.vocab, a.hidden, a.completions, a.length = 500, 32, 3, 12
    cfg = transformers.LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=4 * a.hidden,
        num_hidden_layers=1, num_attention_heads=max(1, a.hidden // 32),
        num_key_value_heads=max(1, a.hidden // 32),
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, a.vocab, (a.completions, a.length + 1), generator=g)
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
    completion = ids[:, 1:]
    advantages = torch.randn(a.completions, 1, generator=g)

    def grpo_step(fn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
        h = hidden.detach().clone().requires_grad_()
        logp, ent = fn(h)
        # the policy-gradient part of GRPO's loss (one iteration: ratio = 1) and an entropy
        # bonus, averaged over tokens
        loss = -(advantages * logp).mean() - 0.01 * ent.mean()
        loss.backward()
        return logp.detach(), ent.detach(), h.grad

    t = a.temperature
    (lp_ref, ent_ref, g_ref), peak_ref = memory.peak_above(
        lambda: grpo_step(lambda h: full_logits(h, model.lm_head, completion, t))
    )
    (lp, ent, gh), peak = memory.peak_above(
        lambda: grpo_step(
            lambda h: token_logps_and_entropy(h, model.lm_head, completion, temperature=t)
        )
    )
    print(f"Llama head vocab {a.vocab}, hidden {a.hidden}; {a.completions} completions x "
          f"{a.length} tokens; temperature {t}")  # fmt: skip
    print(f"log-prob max |diff|: {(lp - lp_ref).abs().max():.2e}")
    print(f"entropy  max |diff|: {(ent - ent_ref).abs().max():.2e}")
    print(f"d hidden max |diff|: {(gh - g_ref).abs().max():.2e}")
    print(f"peak above inputs: full logits {peak_ref.peak / 2**20:.0f} MiB, "
          f"crossent {peak.peak / 2**20:.0f} MiB")  # fmt: skip
    torch.testing.assert_close(lp, lp_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ent, ent_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gh, g_ref, rtol=1e-4, atol=1e-6)


if __name__ == "__main__":
    main()
