"""One ``torch.autograd.Function`` per op family, on ``(M, V)`` row blocks.

The cross-entropy functions compute the per-row loss *and* the gradient of the logits in the
same forward pass (the backend writes it into a buffer); backward then only multiplies that
buffer by the incoming gradient, or returns it untouched when the incoming gradient is 1. The
buffer is kept with ``save_for_backward``, so autograd frees it with the graph. It becomes the
gradient itself (scaled in place) only when the graph is freed after that backward; with
``retain_graph=True`` backward returns a scaled copy, so ``.grad`` and the graph never share
memory (:func:`scale_saved`).

Second derivatives: when backward runs with ``create_graph=True`` (or under a torch.func
transform, whose batched gradients the fused kernels cannot take), the gradient is built
with differentiable torch operations from the inputs instead (:mod:`crossent._composite`),
so that its own derivative is exact. The inputs are kept for that by reference
(:class:`Inputs`), not as saved tensors: nothing is copied, and modifying the logits in
place after the loss, which torch's own cross entropy allows, stays allowed; a second
derivative then raises torch's error. They are let go by a first-order backward that frees
the graph, so the logits live no longer than that backward. Only ``inplace_backward``, which
overwrites the logits, has first-order backward only (:func:`first_order`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from . import _args, _composite
from ._transforms import batched, differentiable_backward
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


def grad_buffer(need: bool, x: Tensor) -> Tensor | None:
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


def mean_denominator(target: Tensor, weight: Tensor | None, ignore_index: int) -> Tensor:
    """The 'mean' denominator: summed weight of the non-ignored targets, in float64."""
    if weight is None:  # a count: exact in int64, without a float64 copy of the mask
        return torch.count_nonzero(target != ignore_index).to(torch.float64)
    w64 = weight.to(torch.float64)
    parts = []
    for t in _chunks(target):
        keep = t != ignore_index
        parts.append(w64[torch.where(keep, t, 0)].masked_fill_(~keep, 0.0).sum())
    return _total(parts)


def reduce_rows(rows: Tensor, reduction: str, denom: Tensor | float | None) -> Tensor:
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
                "crossent: no second derivatives with inplace_backward=True, which overwrites "
                "the logits they need (backward was called with create_graph=True, as for a "
                "gradient penalty or a Hessian-vector product); leave inplace_backward off"
            )
        return fn(ctx, *grads)

    return backward


class Inputs:
    """A Function's inputs kept by reference for a differentiable backward (see the module
    docstring), with their versions at the call: unpacking them after an in-place change
    raises torch's error for a modified saved tensor."""

    def __init__(self, *tensors: Tensor | None) -> None:
        self.tensors = tensors
        self.versions = tuple(None if t is None else t._version for t in tensors)

    def unpack(self) -> tuple[Tensor | None, ...]:
        for i, (t, v) in enumerate(zip(self.tensors, self.versions, strict=True)):
            if t is not None and t._version != v:
                raise RuntimeError(
                    "one of the variables needed for gradient computation has been modified "
                    f"by an inplace operation: [{t.type()} {list(t.shape)}] (input {i} of a "
                    f"crossent function) is at version {t._version}; expected version {v} "
                    "instead. crossent keeps its inputs for second derivatives only"
                )
        return self.tensors

    @staticmethod
    def release(ctx: Any) -> None:
        """Drop ``ctx``'s inputs when the backward now running frees the graph: nothing can
        differentiate through it again, and the logits need not outlive it (autograd keeps a
        Function's node, and so its attributes, as long as the loss tensor lives)."""
        if graph_freed():
            ctx.inputs = None


def _is_one(g: Tensor) -> bool:
    # Only where reading a scalar costs no device synchronisation (elsewhere the backend's
    # scale_ compares with 1 on the device).
    return _args.host_readable(g) and g.dim() == 0 and bool(g == 1)


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


def scale_saved(
    t: Tensor, g: Tensor, rows: bool = False, backend: Backend | None = None
) -> Tensor:
    """A saved gradient ``t`` times the incoming gradient ``g`` (per row of ``t`` when
    ``rows``). When the graph is freed after this backward, ``t`` itself is returned (``g = 1``)
    or scaled in place, so no second buffer of its size exists; when the graph is kept
    (``retain_graph=True``) a new tensor, so that the gradient autograd accumulates into
    ``.grad`` never shares memory with the graph: zeroing or clipping ``.grad``, or an
    in-place accumulation into it, cannot change what a later backward reads. The in-place
    scale by one factor is ``backend``'s :meth:`~crossent.backends.base.Backend.scale_` (on a
    GPU, one that skips the pass when ``g`` is 1 without reading ``g`` on the host)."""
    if rows:
        gg = g.to(t.dtype).reshape(-1, *([1] * (t.dim() - 1)))
    elif _is_one(g):
        return t if graph_freed() else t.clone()
    else:
        # a 0-d factor keeps t's dtype and is not rounded to it first (16-bit t: one rounding)
        gg = g.reshape(()) if g.dtype.is_floating_point else g.to(t.dtype).reshape(())
        if backend is not None and graph_freed():
            return backend.scale_(t, gg)
    return t.mul_(gg) if graph_freed() else t * gg


def index_forward(
    x: Tensor, target: Tensor, weight: Tensor | None, opts: LossOptions, grad: Tensor | None
) -> Tensor:
    """Class-index cross entropy's reduced loss (in x's dtype); writes the gradient of that
    loss into ``grad`` when given (a buffer, or ``x`` itself)."""
    acc = acc_dtype(x.dtype)
    denom = None
    scale = None
    if opts.reduction == "mean":
        denom = mean_denominator(target, weight, opts.rows.ignore_index)
        # A zero total weight makes torch's mean 0/0: NaN loss and NaN gradient on every
        # kept row (ignored rows stay exactly 0). Written without a host synchronisation.
        scale = torch.where(denom == 0, torch.nan, 1.0 / denom).to(acc)
        denom = torch.where(denom == 0, torch.nan, denom)
    stats = opts.backend.cross_entropy_forward(x, target, weight, opts.rows, grad, scale)
    return reduce_rows(stats.loss, opts.reduction, denom).to(x.dtype)


class CrossEntropyIndex(torch.autograd.Function):
    """Cross entropy with class-index targets: ``(M, V)`` logits, ``(M,)`` int64 targets."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, target: Tensor, weight: Tensor | None, opts: LossOptions
    ) -> Tensor:
        need_x = ctx.needs_input_grad[0] and opts.grad_enabled  # type: ignore[attr-defined]
        grad = grad_buffer(need_x, x)
        ctx.save_for_backward(grad)  # type: ignore[arg-type]
        ctx.inputs = Inputs(x, target, weight)  # type: ignore[attr-defined]
        ctx.opts = opts  # type: ignore[attr-defined]
        return index_forward(x, target, weight, opts, grad)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None, None, None]:
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None, None
        opts: LossOptions = ctx.opts
        rows = opts.reduction == "none"
        if torch.is_grad_enabled():
            return (*_composite_grads(ctx, g, False), None)  # type: ignore[return-value]
        Inputs.release(ctx)
        if batched(g):
            return scale(grad, g, rows), None, None, None
        return scale_saved(grad, g, rows, opts.backend), None, None, None


def _composite_grads(ctx: Any, g: Tensor, prob: bool) -> tuple[Tensor | None, ...]:
    """:func:`ce_graph_grads` of a cross-entropy Function's kept inputs."""
    opts: LossOptions = ctx.opts
    wanted = tuple(bool(n) for n in ctx.needs_input_grad[:3])
    return ce_graph_grads(ctx.inputs.unpack(), g, opts.rows, opts.reduction, prob, wanted)


def ce_graph_grads(
    inputs: tuple[Tensor | None, ...], g: Tensor, rows: RowOptions, reduction: str, prob: bool,
    wanted: tuple[bool, ...],
) -> tuple[Tensor | None, ...]:  # fmt: skip
    """Gradients of cross entropy's inputs ``(x, target, weight)`` for the ``wanted`` ones, by
    torch's own operations: differentiable (create_graph) and batchable."""
    loss, leaves = _composite.replay(
        lambda x, t, w: _composite.cross_entropy(x, t, w, rows, reduction, prob), inputs, wanted
    )
    return _composite.gradients(loss, leaves, g, wanted)


def scale(t: Tensor, g: Tensor, rows: bool = False) -> Tensor:
    """``t`` times the incoming gradient ``g`` (per row when ``rows``), a new tensor: the
    value :func:`scale_saved` gives, by operations a transform can batch or trace."""
    if rows:
        return t * g.to(t.dtype).reshape(-1, *([1] * (t.dim() - 1)))
    return t * (g.reshape(()) if g.dtype.is_floating_point else g.to(t.dtype).reshape(()))


def prob_forward(
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
    loss = reduce_rows(stats.loss, opts.reduction, float(m) if m else float("nan"))
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
            need and opts.grad_enabled
            for need in ctx.needs_input_grad[:3]  # type: ignore[attr-defined]
        )
        extra = need_t or need_w
        grad = grad_buffer(need_x, x)
        loss, lse = prob_forward(x, target, weight, opts, grad)
        saved = (x, target, weight, lse) if extra else (None, None, None, None)
        ctx.save_for_backward(grad, *saved)  # type: ignore[arg-type]
        ctx.inputs = Inputs(x, target, weight)  # type: ignore[attr-defined]
        ctx.opts = opts  # type: ignore[attr-defined]
        ctx.m = x.shape[0]  # type: ignore[attr-defined]
        return loss

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        if torch.is_grad_enabled():
            return (*_composite_grads(ctx, g, True), None)  # type: ignore[return-value]
        grad, x, target, weight, lse = ctx.saved_tensors
        opts: LossOptions = ctx.opts
        rows = opts.reduction == "none"
        need_t, need_w = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if batched(g):
            gx = None if grad is None else scale(grad, g, rows)
            if not (need_t or need_w):
                return gx, None, None, None
            _, dt, dw = _composite_grads(ctx, g, True)
            return gx, dt, dw, None
        Inputs.release(ctx)
        gx = None if grad is None else scale_saved(grad, g, rows, opts.backend)
        if not (need_t or need_w):
            return gx, None, None, None
        dt, dw = prob_extra_grads(x, target, weight, lse, g, opts, need_t, need_w)
        return gx, dt, dw, None


def prob_extra_grads(
    x: Tensor, target: Tensor, weight: Tensor | None, lse: Tensor, g: Tensor,
    opts: LossOptions, need_t: bool, need_w: bool,
) -> tuple[Tensor | None, Tensor | None]:  # fmt: skip
    """Probability-target cross entropy's gradients of the target and the class weights,
    for the incoming gradient ``g`` of the reduced loss."""
    m = x.shape[0]
    if opts.reduction == "none":
        row_grad = g
    elif opts.reduction == "mean":
        row_grad = (g / m).expand(m)
    else:
        row_grad = g.expand(m)
    return opts.backend.cross_entropy_prob_extra_grads(
        x, target, weight, lse, row_grad, opts.rows, need_t, need_w
    )


class WriteGrad(torch.autograd.Function):
    """The in-place half of ``inplace_backward``: writes the gradient of the loss over ``x``
    (marked dirty) and returns ``x``; the loss goes to ``out``. Its backward is the identity:
    :class:`LossOfGrad` already gives the gradient with respect to ``x`` as it was.

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
            out.append(prob_forward(x, target, weight, opts, x)[0])
        else:
            out.append(index_forward(x, target, weight, opts, x))
        return x

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None, None, None, None]:
        return g, None, None, None, None, None


class LossOfGrad(torch.autograd.Function):
    """The loss computed by :class:`WriteGrad`, as a function of the gradient it wrote:
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


def in_place(x: Tensor, opts: LossOptions) -> bool:
    return opts.inplace and opts.grad_enabled and x.requires_grad


class NllLoss(torch.autograd.Function):
    """Negative log-likelihood on ``(M, V)`` inputs with ``(M,)`` int64 targets."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, target: Tensor, weight: Tensor | None, opts: LossOptions
    ) -> Tensor:
        loss, denom = nll_forward(x, target, weight, opts)
        ctx.save_for_backward(target, weight, denom)  # type: ignore[arg-type]
        ctx.opts = opts  # type: ignore[attr-defined]
        ctx.shape = x.shape  # type: ignore[attr-defined]
        ctx.dtype = x.dtype  # type: ignore[attr-defined]
        return loss

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        target, weight, denom = ctx.saved_tensors
        opts: LossOptions = ctx.opts
        if differentiable_backward(g):
            grad = nll_graph_grad(
                ctx.shape, ctx.dtype, target, weight, opts.rows.ignore_index, opts.reduction, g
            )
            return grad, None, None, None
        return nll_grad(g, target, weight, denom, opts, ctx.shape[1], ctx.dtype), None, None, None


def nll_graph_grad(
    shape: Any, dtype: torch.dtype, target: Tensor, weight: Tensor | None, ignore_index: int,
    reduction: str, g: Tensor,
) -> Tensor:  # fmt: skip
    """nll_loss's gradient of its input by differentiable, batchable torch operations. It does
    not depend on the input's values, only on its shape: torch's nll_loss of zeros gives it."""
    zeros = torch.zeros(shape, dtype=dtype, device=g.device)
    loss, leaves = _composite.replay(
        lambda x: _composite.nll_loss(x, target, weight, ignore_index, reduction), (zeros,),
        (True,),
    )  # fmt: skip
    grad = _composite.gradients(loss, leaves, g, (True,))[0]
    assert grad is not None
    return grad


def nll_forward(
    x: Tensor, target: Tensor, weight: Tensor | None, opts: LossOptions
) -> tuple[Tensor, Tensor | None]:
    """nll_loss's reduced loss, and the 'mean' denominator (None for other reductions)."""
    rows = opts.backend.nll_forward(x, target, weight, opts.rows.ignore_index)
    denom = None
    if opts.reduction == "mean":
        denom = mean_denominator(target, weight, opts.rows.ignore_index)
    return reduce_rows(rows, opts.reduction, denom).to(x.dtype), denom


def nll_grad(
    g: Tensor, target: Tensor, weight: Tensor | None, denom: Tensor | None, opts: LossOptions,
    num_classes: int, dtype: torch.dtype,
) -> Tensor:  # fmt: skip
    """nll_loss's gradient of its input for the incoming gradient ``g``."""
    row_grad = g.to(acc_dtype(dtype))
    if opts.reduction == "mean":
        assert denom is not None
        row_grad = row_grad / denom
    return opts.backend.nll_backward(
        row_grad, target, weight, opts.rows.ignore_index, num_classes, dtype
    )


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
        if differentiable_backward(g):  # create_graph=True, or a transform
            return softmax_graph_grad(out, g, ctx.opts.log), None
        return ctx.opts.backend.softmax_backward(g.contiguous(), out, ctx.opts.log), None


def softmax_graph_grad(out: Tensor, g: Tensor, log: bool) -> Tensor:
    """softmax's (or log_softmax's) input gradient from its output, in differentiable,
    batchable torch operations on the saved output, whose graph leads back to the input, so
    second derivatives are exact."""
    acc = acc_dtype(out.dtype)
    y, gg = out.to(acc), g.to(acc)
    if log:
        gx = gg - torch.exp(y) * gg.sum(-1, keepdim=True)
    else:
        gx = y * (gg - (gg * y).sum(-1, keepdim=True))
    return gx.to(out.dtype)


# ---- token statistics ------------------------------------------------------------------------


@dataclass(frozen=True)
class StatsOptions:
    """What the token-statistics Functions need besides their tensors."""

    backend: Backend
    rows: RowOptions  # ignore_index, softcap and temperature
    chunk_rows: int  # rows per chunk of a backend's (rows, V) temporaries, or of linear logits
    grad_enabled: bool = True


def stats_outputs(
    ctx: Any, stats: tuple[Tensor, ...], dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The statistics in the input dtype; lse and argmax marked non-differentiable (``ctx``
    of an autograd Function, or None)."""
    lp, ent, lse = (t.to(dtype) for t in stats[:3])
    if ctx is not None:
        ctx.mark_non_differentiable(lse, stats[3])
    return lp, ent, lse, stats[3]


def stats_forward(x: Tensor, target: Tensor, opts: StatsOptions) -> tuple[Tensor, ...]:
    """Token statistics of ``(M, V)`` logits, in the accumulation dtype."""
    return opts.backend.token_stats_forward(x, target, opts.rows, opts.chunk_rows)


def stats_grad(x: Tensor, target: Tensor, g_lp: Tensor, g_h: Tensor, opts: StatsOptions) -> Tensor:
    """The gradient of :func:`stats_forward`'s logits for incoming gradients of logprob and
    entropy, in a new buffer of ``x``'s dtype."""
    acc = acc_dtype(x.dtype)
    out = buffers.empty(x.shape, x.dtype, x.device)  # reused: no first-touch page faults
    opts.backend.token_stats_backward(
        x, target, opts.rows, g_lp.to(acc), g_h.to(acc), out, opts.chunk_rows
    )
    return out


class TokenStatsFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, target: Tensor, opts: StatsOptions
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        stats = stats_forward(x, target, opts)
        ctx.save_for_backward(x, target)
        ctx.opts = opts  # type: ignore[attr-defined]
        return stats_outputs(ctx, stats, x.dtype)

    @staticmethod
    def backward(ctx: Any, g_lp: Tensor, g_h: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        x, target = ctx.saved_tensors
        opts: StatsOptions = ctx.opts
        if differentiable_backward(g_lp, g_h):
            grads = _composite.token_stats_grads((x, target), (g_lp, g_h), opts.rows, (True, False))
            return (*grads, None)
        return stats_grad(x, target, g_lp, g_h, opts), None, None
