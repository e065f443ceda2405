"""TRL: the trainers' fused LM head computed by crossent.

TRL's SFT, GRPO, RLOO and KTO trainers score tokens through a *fused LM head*
(``trl.trainer.utils.add_fused_lm_head``): the model, called with ``fused_lm_head=True``,
returns per-token log-probabilities (and entropies, top-1 hits) under a temperature without
forming the logits. :func:`add_fused_lm_head` is a drop-in for it computed with
:func:`crossent.linear_token_stats`; :func:`apply` makes the trainers created afterwards use it::

    import crossent.integrations.trl
    crossent.integrations.trl.apply()
    trainer = SFTTrainer(model=model, ...)   # or GRPOTrainer, RLOOTrainer, KTOTrainer

Calls it does not cover (MoE router logits, a logit scale, the ``log_sum_sq_probs`` and
``mean_logits`` fields) go to TRL's own head, so results never depend on which one ran.

The same statistics for reinforcement learning by hand (what GRPO computes from full logits,
``selective_log_softmax(logits / T, ids)`` and ``entropy_from_logits(logits / T)``) are
:func:`token_logps_and_entropy`.
"""

from __future__ import annotations

import types
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from ..functional import linear_token_stats

_FIELDS = ("log_probs", "entropy", "is_top1")
_MODULES = (
    "trl.trainer.utils", "trl.trainer.sft_trainer", "trl.trainer.grpo_trainer",
    "trl.trainer.rloo_trainer", "trl.trainer.kto_trainer",
)  # fmt: skip
_saved: dict[str, Any] = {}


def _trl_add_fused_lm_head() -> Any:
    if "add_fused_lm_head" in _saved:
        return _saved["add_fused_lm_head"]
    from trl.trainer import utils

    return utils.add_fused_lm_head


def token_logps_and_entropy(
    hidden_states: Tensor, lm_head: torch.nn.Module, token_ids: Tensor, *,
    temperature: float = 1.0, softcap: float | None = None, ignore_index: int = -100,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Per-token ``log p(token)`` and entropy of ``softmax(lm_head(hidden_states) / T)``, from
    ``(..., D)`` hidden states and ``(...)`` token ids, without the ``(..., V)`` logits: the
    values TRL's GRPO takes from full logits. Differentiable; ``logp`` is 0 where the id is
    ``ignore_index``."""
    stats = linear_token_stats(
        hidden_states, lm_head.weight, token_ids,  # type: ignore[arg-type]
        linear_bias=getattr(lm_head, "bias", None), ignore_index=ignore_index, softcap=softcap,
        temperature=temperature,
    )  # fmt: skip
    return stats.logprob, stats.entropy


def add_fused_lm_head(
    model: Any, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
    outputs: tuple[str, ...] = ("log_probs",),
) -> None:  # fmt: skip
    """TRL's ``add_fused_lm_head`` (same arguments, same outputs), computed with
    :func:`crossent.linear_token_stats`."""
    from trl.trainer.utils import FusedCausalLMOutput

    _trl_add_fused_lm_head()(model, temperature, cast_lm_head_to_fp32, outputs)
    trl_forward = model.forward  # TRL's: ours hands it what it does not cover
    text_config = model.config.get_text_config()
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scaled = any(
        getattr(text_config, a, None) not in (None, 1, 1.0)
        for a in ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
    )
    covered = set(outputs) <= set(_FIELDS) and not scaled

    def forward(
        self: Any, *args: Any, fused_lm_head: bool = False, labels: Tensor | None = None,
        shift_labels: Tensor | None = None, num_items_in_batch: Any = None, **kwargs: Any,
    ) -> Any:  # fmt: skip
        router = kwargs.get("output_router_logits") or getattr(
            text_config, "output_router_logits", False
        )
        if not (fused_lm_head and covered) or router:
            return trl_forward(
                *args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                num_items_in_batch=num_items_in_batch, **kwargs,
            )  # fmt: skip
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            assert labels is not None, "fused_lm_head=True needs labels or shift_labels"
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        head = self.get_output_embeddings()
        weight, bias = head.weight, head.bias
        hidden, labels = hidden.to(weight.device), labels.to(weight.device)
        mask = labels != -100
        context: Any = nullcontext()
        if cast_lm_head_to_fp32:
            hidden, weight = hidden.float(), weight.float()
            bias = None if bias is None else bias.float()
            context = torch.autocast(hidden.device.type, enabled=False)
        with context:
            stats = linear_token_stats(
                hidden, weight, labels, linear_bias=bias, softcap=softcap,
                temperature=temperature,
            )  # fmt: skip
        log_probs = stats.logprob  # 0 where the label is -100
        entropy = stats.entropy.masked_fill(~mask, 0.0) if "entropy" in outputs else None
        is_top1 = (stats.argmax == labels) & mask if "is_top1" in outputs else None
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropy,
            is_top1=is_top1, label_mask=mask,
        )  # fmt: skip

    model.forward = types.MethodType(forward, model)


def apply() -> None:
    """Make TRL's trainers created from now on use :func:`add_fused_lm_head`; :func:`revert`
    undoes it."""
    import importlib

    if "add_fused_lm_head" not in _saved:
        from trl.trainer import utils

        _saved["add_fused_lm_head"] = utils.add_fused_lm_head
    for name in _MODULES:
        module = importlib.import_module(name)
        if hasattr(module, "add_fused_lm_head"):
            vars(module)["add_fused_lm_head"] = add_fused_lm_head


def revert() -> None:
    """Give TRL's trainers back their own fused LM head."""
    import importlib

    original = _saved.pop("add_fused_lm_head", None)
    if original is None:
        return
    for name in _MODULES:
        module = importlib.import_module(name)
        if getattr(module, "add_fused_lm_head", None) is add_fused_lm_head:
            vars(module)["add_fused_lm_head"] = original
