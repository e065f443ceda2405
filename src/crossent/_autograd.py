"""One ``torch.autograd.Function`` per op family, on ``(M, V)`` row blocks.

The cross-entropy functions compute the per-row loss *and* the gradient of the logits in the
same forward pass (the backend writes it into a buffer); backward then only multiplies that
buffer by the incoming gradient, or returns it untouched when the incoming gradient is 1. The
buffer is kept with ``save_for_backward``, so autograd frees it with the graph. It becomes the
gradient itself (scaled in place) only when the graph is freed after that backward; with
``retain_graph=True`` backward returns a scaled copy, so ``.grad`` and the graph never share
memory (:func:`scale_saved`).

Backward passes are first-order only. The cross-entropy Functions save the gradient, not the
logits, so no graph of their backward exists: backward called with ``create_graph=True``
raises at once (:func:`first_order`), instead of returning a gradient that a second
derivative would silently treat as a constant. Softmax's backward builds its graph from
torch operations on the saved output when asked, so its second derivatives are exact;
``nll_loss``'s is ``once_differentiable``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
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
    # Write the gradient over the logits (opt-in; see cross_entropy_loss).
    inplace: bool = False


def _grad_buffer(need: bool, x: Tensor) -> Tensor | None:
    """Where the forward writes the gradient: a new buffer, or nowhere."""
    return buffers.empty(x.shape, x.dtype, x.device) if need else None


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


def first_order(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A backward that computes first derivatives only, from saved gradients: asked to build
    a graph (``create_graph=True``, which a second derivative needs), it raises rather than
    return a gradient without one, whose own derivative would silently be taken as zero."""

    @functools.wraps(fn)
    def backward(ctx: Any, *grads: Any) -> Any:
        if torch.is_grad_enabled():
            raise RuntimeError(
                "crossent: second derivatives of the cross-entropy functions are not "
                "supported (backward was called with create_graph=True, as for a gradient "
                "penalty or a Hessian-vector product); use torch.nn.functional's function there"
            )
        return fn(ctx, *grads)

    return backward


def _is_one(g: Tensor) -> bool:
    # Only on CPU, where reading a scalar costs no device synchronisation.
    return g.device.type == "cpu" and g.dim() == 0 and bool(g == 1)


_keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)


def graph_freed() -> bool:
    """Whether the backward pass now running frees the graph when it ends (no
    ``retain_graph``/``create_graph``): a buffer the graph saved may then leave it, as the
    gradient handed to autograd or scaled in place, since nothing will read it again. Where
    torch cannot tell (a torch without the query, a call outside the engine) the answer is
    no, and buffers are copied."""
    if _keep_graph is None:
        return False
    try:
        return not _keep_graph()
    except RuntimeError:
        return False


def scale_saved(t: Tensor, g: Tensor, rows: bool = False) -> Tensor:
    """A saved gradient ``t`` times the incoming gradient ``g`` (per row of ``t`` when
    ``rows``). When the graph is freed after this backward, ``t`` itself is returned (``g = 1``)
    or scaled in place, so no second buffer of its size exists; when the graph is kept
    (``retain_graph=True``) a new tensor, so that the gradient autograd accumulates into
    ``.grad`` never shares memory with the graph: zeroing or clipping ``.grad``, or an
    in-place accumulation into it, cannot change what a later backward reads."""
    if rows:
        gg = g.to(t.dtype).reshape(-1, *([1] * (t.dim() - 1)))
    elif _is_one(g):
        return t if graph_freed() else t.clone()
    else:
        # a 0-d factor keeps t's dtype and is not rounded to it first (16-bit t: one rounding)
        gg = g.reshape(()) if g.dtype.is_floating_point else g.to(t.dtype).reshape(())
    return t.mul_(gg) if graph_freed() else t * gg


def _index_forward(
    x: Tensor, target: Tensor, weight: Tensor | None, opts: LossOptions, grad: Tensor | None
) -> Tensor:
    """Class-index cross entropy's reduced loss (in x's dtype); writes the gradient of that
    loss into ``grad`` when given (a buffer, or ``x`` itself)."""
    acc = acc_dtype(x.dtype)
    denom = None
    scale = None
    if opts.reduction == "mean":
        denom = _denominator(target, weight, opts.rows.ignore_index)
        # A zero total weight makes torch's mean 0/0: NaN loss and NaN gradient on every
        # kept row (ignored rows stay exactly 0). Written without a host synchronisation.
        scale = torch.where(denom == 0, torch.nan, 1.0 / denom).to(acc)
        denom = torch.where(denom == 0, torch.nan, denom)
    stats = opts.backend.cross_entropy_forward(x, target, weight, opts.rows, grad, scale)
    return _reduce(stats.loss, opts.reduction, denom).to(x.dtype)


class CrossEntropyIndex(torch.autograd.Function):
    """Cross entropy with class-index targets: ``(M, V)`` logits, ``(M,)`` int64 targets."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, target: Tensor, weight: Tensor | None, opts: LossOptions
    ) -> Tensor:
        need_x = ctx.needs_input_grad[0] and opts.grad_enabled  # type: ignore[attr-defined]
        grad = _grad_buffer(need_x, x)
        ctx.save_for_backward(grad)  # type: ignore[arg-type]
        ctx.reduction = opts.reduction  # type: ignore[attr-defined]
        return _index_forward(x, target, weight, opts, grad)

    @staticmethod
    @first_order
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None, None, None]:
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None, None
        return scale_saved(grad, g, ctx.reduction == "none"), None, None, None


def _prob_forward(
    x: Tensor, target: Tensor, weight: Tensor | None, opts: LossOptions, grad: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Probability-target cross entropy's reduced loss (in the promoted dtype of x, target
    and weight) and the rows' lse; writes the loss's gradient into ``grad`` when given."""
    m, v = x.shape
    out_dtype = torch.promote_types(x.dtype, target.dtype)
    if weight is not None:
        out_dtype = torch.promote_types(out_dtype, weight.dtype)
    scale = None
    if opts.reduction == "mean":
        # 'mean' divides by the number of rows, never by the weights (0 rows: 0/0 = NaN).
        scale = torch.tensor(1.0 / m if m else float("inf"), dtype=torch.float64)
    stats = opts.backend.cross_entropy_prob_forward(x, target, weight, opts.rows, grad, scale)
    if v == 0:
        # torch negates an empty sum (-0.0 per row and in total) and divides it by
        # numel / C, 0/0 = NaN, for 'mean'
        rows = torch.full((m,), -0.0, dtype=out_dtype, device=x.device)
        empty = {"none": rows, "sum": rows.new_tensor(-0.0), "mean": rows.new_tensor(torch.nan)}
        return empty[opts.reduction], stats.lse
    loss = _reduce(stats.loss, opts.reduction, float(m) if m else float("nan"))
    return loss.to(out_dtype), stats.lse


class CrossEntropyProb(torch.autograd.Function):
    """Cross entropy with probability targets: logits and targets both ``(M, V)``.

    Differentiable in the logits, the targets and the class weights, as in torch.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, target: Tensor, weight: Tensor | None, opts: LossOptions
    ) -> Tensor:
        need_x, need_t, need_w = (
            need and opts.grad_enabled for need in ctx.needs_input_grad[:3]  # type: ignore[attr-defined]
        )
        extra = need_t or need_w
        grad = _grad_buffer(need_x, x)
        loss, lse = _prob_forward(x, target, weight, opts, grad)
        saved = (x, target, weight, lse) if extra else (None, None, None, None)
        ctx.save_for_backward(grad, *saved)  # type: ignore[arg-type]
        ctx.opts = opts  # type: ignore[attr-defined]
        ctx.m = x.shape[0]  # type: ignore[attr-defined]
        return loss

    @staticmethod
    @first_order
    def backward(
        ctx: Any, g: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        grad, x, target, weight, lse = ctx.saved_tensors
        opts: LossOptions = ctx.opts
        gx = None if grad is None else scale_saved(grad, g, opts.reduction == "none")
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


class _WriteGrad(torch.autograd.Function):
    """The in-place half of ``inplace_backward``: writes the gradient of the loss over ``x``
    (marked dirty) and returns ``x``; the loss goes to ``out``. Its backward is the identity:
    :class:`_LossOfGrad` already gives the gradient with respect to ``x`` as it was.

    Two Functions rather than one that returns both the loss and the dirty ``x``: autograd
    lets a Function that modifies a view in place return only that view, and the logits
    are often views (a reshape, a column slice, a transposed tensor, a ``(C,)`` input as one
    row); this way the view's base is rewritten through autograd's own copy-slices node."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, target: Tensor, weight: Tensor | None, opts: LossOptions,
        prob: bool, out: list[Tensor],
    ) -> Tensor:  # fmt: skip
        ctx.mark_dirty(x)
        if prob:
            out.append(_prob_forward(x, target, weight, opts, x)[0])
        else:
            out.append(_index_forward(x, target, weight, opts, x))
        return x

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None, None, None, None]:
        return g, None, None, None, None, None


class _LossOfGrad(torch.autograd.Function):
    """The loss computed by :class:`_WriteGrad`, as a function of the gradient it wrote:
    backward scales that gradient by the incoming one (:func:`scale_saved`)."""

    @staticmethod
    def forward(ctx: FunctionCtx, grad: Tensor, out: list[Tensor], rows: bool) -> Tensor:
        ctx.save_for_backward(grad)
        ctx.rows = rows  # type: ignore[attr-defined]
        return out.pop()

    @staticmethod
    @first_order
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None]:
        (grad,) = ctx.saved_tensors
        return scale_saved(grad, g, ctx.rows), None, None


def _in_place(x: Tensor, opts: LossOptions) -> bool:
    return opts.inplace and opts.grad_enabled and x.requires_grad


def cross_entropy_loss(
    x: Tensor, target: Tensor, weight: Tensor | None, opts: LossOptions, prob: bool
) -> Tensor:
    """Cross entropy of ``(M, V)`` rows through autograd: class indices ``(M,)``, or
    probabilities ``(M, V)`` when ``prob``. With ``opts.inplace`` (arguments checked by the
    caller) the gradient is written over ``x``."""
    if _in_place(x, opts):
        out: list[Tensor] = []
        dirty = _WriteGrad.apply(x, target, weight, opts, prob, out)
        return _LossOfGrad.apply(dirty, out, opts.reduction == "none")
    function = CrossEntropyProb if prob else CrossEntropyIndex
    return function.apply(x, target, weight, opts)


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
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        (out,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: the same formula in differentiable torch operations on the
            # saved output, whose graph leads back here, so second derivatives are exact
            acc = acc_dtype(out.dtype)
            y, gg = out.to(acc), g.to(acc)
            if ctx.opts.log:
                gx = gg - torch.exp(y) * gg.sum(-1, keepdim=True)
            else:
                gx = y * (gg - (gg * y).sum(-1, keepdim=True))
            return gx.to(out.dtype), None
        return ctx.opts.backend.softmax_backward(g.contiguous(), out, ctx.opts.log), None
