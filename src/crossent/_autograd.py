"""One ``torch.autograd.Function`` per op family, on ``(M, V)`` row blocks.

The cross-entropy functions compute the per-row loss *and* the gradient of the logits in the
same forward pass (the backend writes it into a buffer); backward then only multiplies that
buffer by the incoming gradient, or returns it untouched when the incoming gradient is 1. The
buffer is kept with ``save_for_backward``, so autograd frees it with the graph, and a
``retain_graph=True`` second backward sees it unchanged.

Backward passes are ``once_differentiable``: asking for a second derivative raises instead of
returning a wrong one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from .backends import buffers
from .backends.base import Backend, RowOptions, acc_dtype


@dataclass(frozen=True)
class LossOptions:
    """What a loss Function needs besides its tensors."""

    backend: Backend
    rows: RowOptions
    reduction: str  # 'none' | 'mean' | 'sum'
    # Grad mode at the call: Function.forward always runs with grad disabled and its
    # needs_input_grad ignores no_grad(), so inference would otherwise pay for a gradient.
    grad_enabled: bool = True
    # Write the gradient over the logits (opt-in): the forward then also returns the logits,
    # marked dirty, so autograd knows they changed.
    inplace: bool = False


def _grad_buffer(ctx: Any, x: Tensor, opts: LossOptions, need: bool) -> Tensor | None:
    """Where the forward writes the gradient: a new buffer, the logits themselves, or nowhere."""
    if not need:
        return None
    if opts.inplace:
        ctx.mark_dirty(x)
        return x
    return buffers.empty(x.shape, x.dtype, x.device)


def _outputs(loss: Tensor, x: Tensor, grad: Tensor | None) -> Tensor | tuple[Tensor, Tensor]:
    # a tensor marked dirty must be returned by the forward
    return (loss, x) if grad is not None and grad is x else loss


# On CPU, a sum with a wider dtype first casts its whole input: long vectors are summed in
# chunks of this many elements, so the float64 copies stay small next to the loss's one
# logits-sized buffer (on GPU the cast happens inside the reduction).
_SUM_CHUNK = 1 << 14


def _chunks(t: Tensor) -> tuple[Tensor, ...]:
    if t.device.type != "cpu" or t.numel() <= _SUM_CHUNK:
        return (t,)
    return t.reshape(-1).split(_SUM_CHUNK)


def _total(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum()


def _sum64(t: Tensor) -> Tensor:
    """``Σ t`` accumulated in float64 (by chunks on CPU: :data:`_SUM_CHUNK`)."""
    return _total([c.sum(dtype=torch.float64) for c in _chunks(t)])


def _denominator(target: Tensor, weight: Tensor | None, ignore_index: int) -> Tensor:
    """The 'mean' denominator: summed weight of the non-ignored targets, in float64."""
    if weight is None:  # a count: exact in int64, without a float64 copy of the mask
        return torch.count_nonzero(target != ignore_index).to(torch.float64)
    w64 = weight.to(torch.float64)
    parts = []
    for t in _chunks(target):
        keep = t != ignore_index
        parts.append(w64[torch.where(keep, t, 0)].masked_fill_(~keep, 0.0).sum())
    return _total(parts)


def _reduce(rows: Tensor, reduction: str, denom: Tensor | float | None) -> Tensor:
    """Reduce per-row losses; sums of M row values are accumulated in float64."""
    if reduction == "none":
        return rows
    total = _sum64(rows)
    if reduction == "sum":
        return total
    assert denom is not None
    return total / denom


def _is_one(g: Tensor) -> bool:
    # Only on CPU, where reading a scalar costs no device synchronisation.
    return g.device.type == "cpu" and g.dim() == 0 and bool(g == 1)


def _scale_saved_grad(grad: Tensor, g: Tensor, reduction: str) -> Tensor:
    """The saved per-row gradient times the incoming gradient ``g``."""
    if reduction == "none":
        return grad * g.to(grad.dtype).unsqueeze(1)
    if _is_one(g):
        return grad  # the buffer itself: autograd can hand it over without a copy
    return grad * g.to(grad.dtype)


class CrossEntropyIndex(torch.autograd.Function):
    """Cross entropy with class-index targets: ``(M, V)`` logits, ``(M,)`` int64 targets."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, target: Tensor, weight: Tensor | None, opts: LossOptions
    ) -> Tensor | tuple[Tensor, Tensor]:
        acc = acc_dtype(x.dtype)
        denom = None
        scale = None
        if opts.reduction == "mean":
            denom = _denominator(target, weight, opts.rows.ignore_index)
            # A zero total weight makes torch's mean 0/0: NaN loss and NaN gradient on every
            # kept row (ignored rows stay exactly 0). Written without a host synchronisation.
            scale = torch.where(denom == 0, torch.nan, 1.0 / denom).to(acc)
            denom = torch.where(denom == 0, torch.nan, denom)
        need_x = ctx.needs_input_grad[0] and opts.grad_enabled  # type: ignore[attr-defined]
        grad = _grad_buffer(ctx, x, opts, need_x)
        stats = opts.backend.cross_entropy_forward(x, target, weight, opts.rows, grad, scale)
        ctx.save_for_backward(grad)  # type: ignore[arg-type]
        ctx.reduction = opts.reduction  # type: ignore[attr-defined]
        return _outputs(_reduce(stats.loss, opts.reduction, denom).to(x.dtype), x, grad)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor, *_: Any) -> tuple[Tensor | None, None, None, None]:
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None, None
        return _scale_saved_grad(grad, g, ctx.reduction), None, None, None


class CrossEntropyProb(torch.autograd.Function):
    """Cross entropy with probability targets: logits and targets both ``(M, V)``.

    Differentiable in the logits, the targets and the class weights, as in torch.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, target: Tensor, weight: Tensor | None, opts: LossOptions
    ) -> Tensor | tuple[Tensor, Tensor]:
        need_x, need_t, need_w = (
            need and opts.grad_enabled for need in ctx.needs_input_grad[:3]  # type: ignore[attr-defined]
        )
        m = x.shape[0]
        out_dtype = torch.promote_types(x.dtype, target.dtype)
        if weight is not None:
            out_dtype = torch.promote_types(out_dtype, weight.dtype)
        scale = None
        if opts.reduction == "mean":
            # 'mean' divides by the number of rows, never by the weights (0 rows: 0/0 = NaN).
            scale = torch.tensor(1.0 / m if m else float("inf"), dtype=torch.float64)
        extra = need_t or need_w
        if extra and need_x and opts.inplace:
            raise RuntimeError(
                "inplace_backward=True cannot be used when the target or the weight requires "
                "grad: their gradients need the logits, which it overwrites"
            )
        grad = _grad_buffer(ctx, x, opts, need_x)
        stats = opts.backend.cross_entropy_prob_forward(x, target, weight, opts.rows, grad, scale)
        saved = (x, target, weight, stats.lse) if extra else (None, None, None, None)
        ctx.save_for_backward(grad, *saved)  # type: ignore[arg-type]
        ctx.opts = opts  # type: ignore[attr-defined]
        ctx.m = m  # type: ignore[attr-defined]
        denom = float(m) if m else float("nan")
        return _outputs(_reduce(stats.loss, opts.reduction, denom).to(out_dtype), x, grad)

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, g: Tensor, *_: Any
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        grad, x, target, weight, lse = ctx.saved_tensors
        opts: LossOptions = ctx.opts
        gx = None if grad is None else _scale_saved_grad(grad, g, opts.reduction)
        need_t, need_w = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if not (need_t or need_w):
            return gx, None, None, None
        m = ctx.m
        if opts.reduction == "none":
            row_grad = g
        elif opts.reduction == "mean":
            row_grad = (g / m).expand(m)
        else:
            row_grad = g.expand(m)
        dt, dw = opts.backend.cross_entropy_prob_extra_grads(
            x, target, weight, lse, row_grad, opts.rows, need_t, need_w
        )
        return gx, dt, dw, None


class NllLoss(torch.autograd.Function):
    """Negative log-likelihood on ``(M, V)`` inputs with ``(M,)`` int64 targets."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, target: Tensor, weight: Tensor | None, opts: LossOptions
    ) -> Tensor:
        rows = opts.backend.nll_forward(x, target, weight, opts.rows.ignore_index)
        denom = None
        if opts.reduction == "mean":
            denom = _denominator(target, weight, opts.rows.ignore_index)
        ctx.save_for_backward(target, weight, denom)  # type: ignore[arg-type]
        ctx.opts = opts  # type: ignore[attr-defined]
        ctx.shape = x.shape  # type: ignore[attr-defined]
        ctx.dtype = x.dtype  # type: ignore[attr-defined]
        return _reduce(rows, opts.reduction, denom).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        target, weight, denom = ctx.saved_tensors
        opts: LossOptions = ctx.opts
        row_grad = g.to(acc_dtype(ctx.dtype))
        if opts.reduction == "mean":
            row_grad = row_grad / denom
        grad = opts.backend.nll_backward(
            row_grad, target, weight, opts.rows.ignore_index, ctx.shape[1], ctx.dtype
        )
        return grad, None, None, None


@dataclass(frozen=True)
class SoftmaxOptions:
    backend: Backend
    log: bool


class Softmax(torch.autograd.Function):
    """softmax / log_softmax over the last dim of a ``(M, V)`` block."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, opts: SoftmaxOptions) -> Tensor:
        out = opts.backend.softmax_forward(x, opts.log)
        ctx.save_for_backward(out)
        ctx.opts = opts  # type: ignore[attr-defined]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        (out,) = ctx.saved_tensors
        return ctx.opts.backend.softmax_backward(g.contiguous(), out, ctx.opts.log), None
