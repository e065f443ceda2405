"""Fine-tune a small random-init Llama with and without crossent's transformers patch.

Both runs start from the same weights and batches; the patched model computes its loss with
crossent.linear_cross_entropy on the hidden states (no logits). Prints each step's loss for
both (the same, to float32 rounding), the step time and the step's peak resident memory.

    python examples/hf_finetune.py               # vocab 32000, hidden 256, seq 256, batch 2
    python examples/hf_finetune.py --tiny        # seconds (what CI runs)
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import transformers

import crossent.integrations.transformers as cx
from crossent.bench import memory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--tiny", action="store_true", help="vocab 500, hidden 32, seq 16, 3 steps")
    a = p.parse_args()
    if a.tiny:
        a.vocab, a.hidden, a.seq, a.steps = 500, 32, 16, 3
    cfg = transformers.LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=4 * a.hidden,
        num_hidden_layers=2, num_attention_heads=max(1, a.hidden // 32),
        num_key_value_heads=max(1, a.hidden // 32),
    )  # fmt: skip
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, a.vocab, (a.batch, a.seq), generator=g) for _ in range(a.steps)]

    def run(name: str) -> list[tuple[float, float, float]]:
        model = copy.deepcopy(base).train()
        if name == "crossent":
            cx.apply(model)
        # one untimed forward+backward on a copy first: loads (or compiles) the kernels
        copy.deepcopy(model)(input_ids=batches[0], labels=batches[0]).loss.backward()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step(ids: torch.Tensor) -> float:
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            return loss.item()

        rows = []
        for ids in batches:
            t0 = time.perf_counter()
            loss, peak = memory.peak_above(lambda ids=ids: step(ids))
            rows.append((loss, time.perf_counter() - t0, peak.peak / 2**20))
        return rows

    results = {name: run(name) for name in ("stock", "crossent")}

    print(f"Llama vocab {a.vocab}, hidden {a.hidden}, seq {a.seq}, batch {a.batch}, float32")
    print("step | loss stock | loss crossent | time stock | time crossent | peak stock | "
          "peak crossent")  # fmt: skip
    for i, (s, c) in enumerate(zip(results["stock"], results["crossent"], strict=True)):
        print(f"{i:4d} | {s[0]:10.6f} | {c[0]:13.6f} | {s[1]:8.3f} s | {c[1]:11.3f} s | "
              f"{s[2]:6.0f} MiB | {c[2]:9.0f} MiB")  # fmt: skip
    pairs = zip(results["stock"], results["crossent"], strict=True)
    worst = max(abs(s[0] - c[0]) for s, c in pairs)
    print(f"largest loss difference: {worst:.2e}")
    if worst > 1e-3:
        raise SystemExit("the patched model's losses differ from the stock model's")


if __name__ == "__main__":
    main()
