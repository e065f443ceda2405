"""Hugging Face transformers: causal LMs whose training loss never materialises the logits.

::

    import crossent.integrations.transformers as cx
    model = AutoModelForCausalLM.from_config(config)
    cx.apply(model)                       # this model
    cx.apply_to_model_class(LlamaForCausalLM)   # or every model of a class

A patched model called with ``labels`` (or ``shift_labels``) while training runs its
backbone, then computes the loss with :func:`crossent.linear_cross_entropy` on the final
hidden states and the LM head's weight (and bias): the ``(batch, seq, vocab)`` logits are
never formed, and ``outputs.logits`` is ``None``. Everything transformers' own loss does is
kept: labels shifted by one with ``ignore_index=-100`` (or ``shift_labels`` taken as they
are), ``num_items_in_batch`` (the Trainer's normalisation under gradient accumulation: a sum
divided by it, folded into the gradient), ``logits_to_keep``, the float32 loss of a 16-bit
model (transformers upcasts its logits), Gemma 2/3's ``final_logit_softcapping``, tied
embeddings and a head bias. In every other case (no labels, evaluation, generation, a loss
function other than the model's default causal-LM loss) the model's own forward runs,
unchanged.

Supported families (``config.model_type``): :data:`SUPPORTED`. Others raise ``ValueError``:
their forward may transform the logits in ways the fused loss would not reproduce.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..functional import linear_cross_entropy

SUPPORTED = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2"}
)
_PATCHED = "_crossent_forward"


def _check_supported(config: Any, what: str) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(
            f"crossent.integrations.transformers: {what} has model_type {model_type!r}; "
            f"supported: {', '.join(sorted(SUPPORTED))}"
        )
    for attr in ("logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            raise ValueError(
                f"crossent.integrations.transformers: {what} scales its logits ({attr}="
                f"{getattr(config, attr)!r}), which the fused loss does not reproduce"
            )


def causal_lm_loss(
    hidden_states: Tensor, lm_head: torch.nn.Module, labels: Tensor | None,
    num_items_in_batch: Tensor | int | None = None, ignore_index: int = -100,
    shift_labels: Tensor | None = None, softcap: float | None = None, **_: Any,
) -> Tensor:  # fmt: skip
    """transformers' ``ForCausalLMLoss`` of ``lm_head(hidden_states)``, fused: labels shifted
    (unless ``shift_labels`` are given), the logits read in float32, a mean over the kept
    tokens or a sum divided by ``num_items_in_batch``."""
    if shift_labels is None:
        if labels is None:
            raise ValueError("causal_lm_loss needs labels or shift_labels")
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    weight: Tensor = lm_head.weight  # type: ignore[assignment]
    bias = getattr(lm_head, "bias", None)
    h = hidden_states.reshape(-1, hidden_states.shape[-1])
    t = shift_labels.reshape(-1).to(h.device)
    if h.shape[0] != t.shape[0]:  # transformers' own error for a logits/labels mismatch
        raise ValueError(
            f"Expected input batch_size ({h.shape[0]}) to match target batch_size ({t.shape[0]})."
        )
    kw: dict[str, Any] = {"linear_bias": bias, "ignore_index": ignore_index, "softcap": softcap}
    if num_items_in_batch is None:
        kw["reduction"] = "mean"
    else:
        kw["reduction"] = "sum"
        kw["divisor"] = num_items_in_batch
    return linear_cross_entropy(h, weight, t, logits_dtype=torch.float32, **kw)


def _output_class(base_output: Any) -> Any:
    from transformers.modeling_outputs import (
        CausalLMOutputWithCrossAttentions,
        CausalLMOutputWithPast,
    )

    if "cross_attentions" in getattr(base_output, "__dataclass_fields__", {}):
        return CausalLMOutputWithCrossAttentions
    return CausalLMOutputWithPast


def _slice(hidden: Tensor, logits_to_keep: Any) -> Tensor:
    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:  # older transformers: an int or a 1-D index tensor
        if isinstance(logits_to_keep, int):
            return hidden[:, slice(-logits_to_keep, None) if logits_to_keep else slice(None), :]
        return hidden[:, logits_to_keep, :]
    return slice_logits_to_keep(hidden, logits_to_keep)


def _uses_default_loss(model: Any) -> bool:
    """Whether the model's loss is transformers' causal-LM cross entropy (its ``loss_type``
    default), not a loss function the user or the config chose."""
    from transformers.loss.loss_utils import LOSS_MAPPING

    custom = model.__dict__.get("_loss_function")
    if custom is not None:
        return custom is LOSS_MAPPING["ForCausalLM"]
    loss_type = getattr(model, "loss_type", None)
    return loss_type is None or loss_type not in LOSS_MAPPING or loss_type == "ForCausalLM"


def fused_forward(original: Callable[..., Any], fused: bool | None = None) -> Callable[..., Any]:
    """A causal LM's ``forward`` (the unbound class function ``original``) that computes the
    loss with :func:`causal_lm_loss` when labels are given and ``fused`` is True, or is None
    and the model is training; otherwise ``original`` itself."""
    signature = inspect.signature(original)
    params = list(signature.parameters.values())
    var_kw = next((p.name for p in params if p.kind is p.VAR_KEYWORD), None)

    @functools.wraps(original)
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        use = self.training if fused is None else fused
        if not use or not _uses_default_loss(self):
            return original(self, *args, **kwargs)
        return_dict = kwargs.pop("return_dict", None)
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError:  # deprecated argument names and the like: the model's own forward
            if return_dict is not None:
                kwargs["return_dict"] = return_dict
            return original(self, *args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.pop(params[0].name)
        extra = arguments.pop(var_kw, {}) if var_kw else {}
        labels = arguments.pop("labels", None)
        logits_to_keep = arguments.pop("logits_to_keep", 0)
        if labels is None and extra.get("shift_labels") is None:
            if return_dict is not None:
                kwargs["return_dict"] = return_dict
            return original(self, *args, **kwargs)
        _check_supported(self.config, type(self).__name__)
        base = getattr(self, self.base_model_prefix)
        outputs = base(**arguments, **extra)
        hidden = _slice(outputs[0], logits_to_keep)
        softcap = getattr(self.config, "final_logit_softcapping", None)
        loss = causal_lm_loss(hidden, self.lm_head, labels, softcap=softcap, **extra)
        fields = {k: v for k, v in outputs.items() if k != "last_hidden_state"}
        result = _output_class(outputs)(loss=loss, logits=None, **fields)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        return result if return_dict else result.to_tuple()

    setattr(forward, _PATCHED, original)
    return forward


def apply(model: Any, *, fused: bool | None = None) -> Any:
    """Patch ``model`` (a causal LM of a :data:`SUPPORTED` family; also the language model
    inside a PEFT wrapper) so that its training loss is fused. ``fused``: ``None`` (default)
    fuses while the model is training, ``True`` whenever labels are given, ``False`` never.
    Returns the model. :func:`revert` undoes it."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    _check_supported(target.config, type(target).__name__)
    if not hasattr(target, "lm_head"):
        raise ValueError(f"{type(target).__name__} has no lm_head: not a causal language model")
    revert(target)
    target.forward = types.MethodType(fused_forward(type(target).forward, fused), target)
    return model


def revert(model: Any) -> Any:
    """Undo :func:`apply` (a model that was not patched is left as it is)."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    current = target.__dict__.get("forward")
    if current is not None and hasattr(getattr(current, "__func__", None), _PATCHED):
        del target.forward
    return model


def apply_to_model_class(cls: type, *, fused: bool | None = None) -> None:
    """Patch every model of the causal-LM class ``cls`` (e.g. ``LlamaForCausalLM``), before or
    after they are created; :func:`revert_model_class` undoes it."""
    config_class = getattr(cls, "config_class", None)
    model_type = getattr(config_class, "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(
            f"crossent.integrations.transformers: {cls.__name__} has model_type "
            f"{model_type!r}; supported: {', '.join(sorted(SUPPORTED))}"
        )
    revert_model_class(cls)
    cls.forward = fused_forward(cls.forward, fused)  # type: ignore[attr-defined]


def revert_model_class(cls: type) -> None:
    """Undo :func:`apply_to_model_class`."""
    original = getattr(cls.__dict__.get("forward"), _PATCHED, None)
    if original is not None:
        cls.forward = original  # type: ignore[attr-defined]
