"""A training step of a transformers Llama, forward+backward, with and without crossent.

The case shape is ``(V, D, T, B)``: vocabulary, hidden size, sequence length, batch (one
decoder layer, random init from a config, float32). Providers: the stock model
(``torch-eager``, the baseline: logits materialised, transformers' float32 cross entropy),
the model patched by :func:`crossent.integrations.transformers.apply` (``crossent``: the loss
by :func:`crossent.linear_cross_entropy` on the hidden states, no logits), and the stock
model's logits with :func:`crossent.cross_entropy` as the loss (``crossent-logits``).
Checked: the loss, and sampled rows of the LM head's gradient, against float64 evaluations
from the model's own final hidden states. Needs transformers (the ``hf`` extra).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from crossent.testing import compare

from .cases import Case, Check, Family, Inputs, NotApplicable, register
from .logits import merge_verdicts
from .providers import TORCH_EAGER, Provider

PATCHED = Provider("crossent", "crossent-llama", about="integrations.transformers.apply")
LOGITS = Provider("crossent-logits", "crossent-llama-logits",
                  about="stock logits, crossent.cross_entropy loss")  # fmt: skip
CHUNK = 128
SAMPLED = 16


def _model(case: Case) -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise NotApplicable("transformers is not installed (pip install crossent[hf])") from exc
    v, d, _, _ = case.shape
    cfg = transformers.LlamaConfig(
        vocab_size=v, hidden_size=d, intermediate_size=4 * d, num_hidden_layers=1,
        num_attention_heads=max(1, d // 64), num_key_value_heads=max(1, d // 64),
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model: Any = transformers.LlamaForCausalLM(cfg)
    return model.to(case.torch_dtype).train()


@register
class LlamaStep(Family):
    name = "llama_step"
    description = (
        "a transformers Llama (1 layer) training step, forward+backward: stock, patched by "
        "crossent.integrations.transformers, or stock logits with crossent.cross_entropy"
    )
    shapes = ((128256, 512, 512, 2),)
    quick_shapes = ((1000, 64, 32, 2),)
    dtypes = ("float32",)

    def make_inputs(self, case: Case, seed: int = 0) -> Inputs:
        model = _model(case)
        v, _, t, b = case.shape
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, v, (b, t), generator=g)
        labels = ids.clone()
        labels[:, : t // 8] = -100  # a prompt
        return Inputs((model, ids, labels), leaves=tuple(model.parameters()))

    def providers(self, case: Case, available: Iterable[Provider]) -> list[Provider]:
        return [TORCH_EAGER, PATCHED, LOGITS]

    def torch_fn(self, case: Case) -> Callable[..., Tensor]:
        def fn(model: Any, ids: Tensor, labels: Tensor) -> Tensor:
            return model(input_ids=ids, labels=labels).loss

        return fn

    def crossent_fn(self, case: Case, backend: str) -> Callable[..., Tensor]:
        return self.callable(PATCHED, case)

    def callable(self, provider: Provider, case: Case) -> Callable[..., Tensor]:
        if provider == TORCH_EAGER:
            return self.torch_fn(case)
        import crossent
        from crossent.integrations import transformers as cx

        if provider == PATCHED:

            def patched(model: Any, ids: Tensor, labels: Tensor) -> Tensor:
                if "forward" not in model.__dict__:
                    cx.apply(model)
                return model(input_ids=ids, labels=labels).loss

            return patched

        def on_logits(model: Any, ids: Tensor, labels: Tensor) -> Tensor:
            logits = model(input_ids=ids).logits
            shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
            return crossent.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                          shifted.reshape(-1))  # fmt: skip

        return on_logits

    def min_bytes(self, case: Case) -> int:
        v, d, t, b = case.shape
        return 4 * v * d  # the head's weight is read at least once

    def floor(self, case: Case) -> Case | None:
        return None

    def check(self, case: Case, inputs: Inputs, out: Tensor, full: bool = False) -> Check:
        model, ids, labels = inputs.args
        with torch.no_grad():
            hidden = model.model(input_ids=ids).last_hidden_state.double()
        w64 = model.lm_head.weight.detach().double()
        shifted = F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
        h = hidden.reshape(-1, hidden.shape[-1])
        keep = shifted != -100
        n = int(keep.sum())
        cols = torch.linspace(0, w64.shape[0] - 1, SAMPLED).round().long().unique()
        total = torch.zeros((), dtype=torch.float64)
        dw = torch.zeros(len(cols), w64.shape[1], dtype=torch.float64)
        for lo in range(0, h.shape[0], CHUNK):
            hi = min(lo + CHUNK, h.shape[0])
            k = keep[lo:hi]
            logits = h[lo:hi][k] @ w64.t()
            y = shifted[lo:hi][k]
            lse = torch.logsumexp(logits, 1)
            total += (lse - logits.gather(1, y[:, None])[:, 0]).sum()
            p = torch.exp(logits[:, cols] - lse[:, None])
            p -= (y[:, None] == cols[None, :]).double()
            dw += p.t() @ h[lo:hi][k]
        out_ok, msg = merge_verdicts([("loss", compare(out.detach(), total / n, None))])
        grad = model.lm_head.weight.grad
        if grad is None:
            return Check(out_ok, False, msg or "no gradient of the LM head")
        grad_ok, gmsg = merge_verdicts(
            [("d lm_head (sampled rows)", compare(grad[cols], dw / n, None))]
        )
        return Check(out_ok, grad_ok, msg or gmsg)
