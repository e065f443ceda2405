"""crossent's kernels as ``torch.library`` custom operators, for ``torch.compile``.

When Dynamo traces a call (:func:`crossent._transforms.compiling`), the public functions
check their arguments and flatten them as in eager mode, then call one operator here instead
of an autograd Function. Each operator is opaque to the compiler: a fake implementation
gives its outputs' shapes and dtypes, and its autograd formula is the eager Function's, so a
compiled graph (``fullgraph=True``, no graph break) runs the same kernels on the same
arguments and gives the eager results bit for bit. Checks that read tensor values (the
targets' range) run inside the operators. Backward formulas differentiate their own
arguments with torch's operations when a graph of the gradient is asked for
(``create_graph``), as in eager mode.

Operators (``torch.ops.crossent.*``): ``cross_entropy`` and ``cross_entropy_prob_grads``;
``nll_loss`` and ``nll_loss_backward``; ``softmax`` and ``softmax_backward``;
``linear_cross_entropy`` and ``linear_cross_entropy_backward``; ``token_stats``,
``token_stats_backward``, ``linear_token_stats`` and ``linear_token_stats_backward``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.library import custom_op

from ._args import check_target_range
from ._autograd import (
    LossOptions,
    SoftmaxOptions,
    StatsOptions,
    ce_graph_grads,
    grad_buffer,
    index_forward,
    nll_forward,
    nll_grad,
    nll_graph_grad,
    prob_extra_grads,
    prob_forward,
    scale,
    softmax_graph_grad,
    stats_forward,
    stats_grad,
    stats_outputs,
)
from ._composite import token_stats_grads
from ._linear import (
    LinearOptions,
    composite_grads,
    linear_forward,
    linear_none_grads,
    linear_stats_forward,
    linear_stats_grads,
)
from .backends.base import RowOptions, prob_acc_dtype
from .dispatch import resolve

_EMPTY = (0,)


def backend_name(opts: Any) -> str:
    """The registered name of a call's backend (compiled graphs name backends by string)."""
    from .dispatch import REGISTRY

    name = opts.backend.name
    if name not in REGISTRY:
        raise NotImplementedError(
            f"crossent: the {name!r} backend cannot run under torch.compile; call it outside "
            "the compiled region (torch.compiler.disable)"
        )
    return name


def _rows(ii: int, ls: float, z: float, cap: float | None, temp: float) -> RowOptions:
    return RowOptions(
        ignore_index=ii, label_smoothing=ls, z_loss=z, softcap=cap, temperature=temp
    )


def _row_args(r: RowOptions) -> tuple[int, float, float, float | None, float]:
    return r.ignore_index, r.label_smoothing, r.z_loss, r.softcap, r.temperature


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(_EMPTY) if t is None else t


# ---- cross entropy ---------------------------------------------------------------------------


@custom_op("crossent::cross_entropy", mutates_args=())
def _cross_entropy(
    x: Tensor, target: Tensor, weight: Tensor | None, backend: str, reduction: str,
    ignore_index: int, label_smoothing: float, z_loss: float, softcap: float | None,
    temperature: float, prob: bool, need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    rows = _rows(ignore_index, label_smoothing, z_loss, softcap, temperature)
    opts = LossOptions(resolve(backend, x), rows, reduction)
    grad = grad_buffer(need_grad, x)
    if prob:
        loss, lse = prob_forward(x, target, weight, opts, grad)
        lse = lse.clone() if lse._base is not None else lse
    else:
        check_target_range(target, x.shape[1], ignore_index)
        loss = index_forward(x, target, weight, opts, grad)
        lse = x.new_empty(_EMPTY, dtype=torch.float32)
    return loss, _or_empty(grad, x), lse


@_cross_entropy.register_fake
def _(x, target, weight, backend, reduction, ignore_index, label_smoothing, z_loss, softcap,
      temperature, prob, need_grad):  # fmt: skip
    m = x.shape[0]
    if prob:
        dtype = torch.promote_types(x.dtype, target.dtype)
        if weight is not None:
            dtype = torch.promote_types(dtype, weight.dtype)
        lse = x.new_empty((m,), dtype=prob_acc_dtype(x, target, weight))
    else:
        dtype = x.dtype
        lse = x.new_empty(_EMPTY, dtype=torch.float32)
    loss = x.new_empty((m,) if reduction == "none" else (), dtype=dtype)
    grad = x.new_empty(x.shape) if need_grad else x.new_empty(_EMPTY)
    return loss, grad, lse


def _cross_entropy_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    x, target, weight = inputs[:3]
    _, grad, lse = output
    ctx.mark_non_differentiable(grad, lse)
    ctx.save_for_backward(x, target, weight, grad, lse)
    ctx.args = inputs[3:]


def _cross_entropy_backward(ctx: Any, g: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
    x, target, weight, grad, lse = ctx.saved_tensors
    backend, reduction, ii, ls, z, cap, temp, prob, need_grad = ctx.args
    rows = _rows(ii, ls, z, cap, temp)
    wanted = tuple(bool(n) for n in ctx.needs_input_grad[:3])
    nones = (None,) * 9
    if torch.is_grad_enabled():  # create_graph: a gradient differentiable in its inputs
        return (*ce_graph_grads((x, target, weight), g, rows, reduction, prob, wanted), *nones)
    gx = scale(grad, g, reduction == "none") if need_grad and wanted[0] else None
    dt = dw = None
    if prob and (wanted[1] or wanted[2]):
        dt, dw = torch.ops.crossent.cross_entropy_prob_grads(
            x, target, weight, lse, g, backend, reduction, ls, z, cap, temp, wanted[1],
            wanted[2],
        )  # fmt: skip
        dt, dw = (dt if wanted[1] else None), (dw if wanted[2] else None)
    return (gx, dt, dw, *nones)


_cross_entropy.register_autograd(_cross_entropy_backward, setup_context=_cross_entropy_setup)


@custom_op("crossent::cross_entropy_prob_grads", mutates_args=())
def _cross_entropy_prob_grads(
    x: Tensor, target: Tensor, weight: Tensor | None, lse: Tensor, g: Tensor, backend: str,
    reduction: str, label_smoothing: float, z_loss: float, softcap: float | None,
    temperature: float, want_target: bool, want_weight: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    rows = _rows(-100, label_smoothing, z_loss, softcap, temperature)
    opts = LossOptions(resolve(backend, x), rows, reduction)
    dt, dw = prob_extra_grads(x, target, weight, lse, g, opts, want_target, want_weight)
    return _or_empty(dt, target), _or_empty(dw, target)


@_cross_entropy_prob_grads.register_fake
def _(x, target, weight, lse, g, backend, reduction, label_smoothing, z_loss, softcap,
      temperature, want_target, want_weight):  # fmt: skip
    dt = target.new_empty(target.shape) if want_target else target.new_empty(_EMPTY)
    dw = target.new_empty(_EMPTY)
    if want_weight and weight is not None:
        dw = weight.new_empty(weight.shape)
    return dt, dw


def cross_entropy(
    x: Tensor, target: Tensor, weight: Tensor | None, opts: LossOptions, prob: bool
) -> Tensor:
    """The compiled form of :func:`crossent._calls.cross_entropy_loss`."""
    need = opts.grad_enabled and x.requires_grad
    loss, _, _ = torch.ops.crossent.cross_entropy(
        x, target, weight, backend_name(opts), opts.reduction, *_row_args(opts.rows), prob, need
    )
    return loss


# ---- nll_loss --------------------------------------------------------------------------------


@custom_op("crossent::nll_loss", mutates_args=())
def _nll_loss(
    x: Tensor, target: Tensor, weight: Tensor | None, backend: str, reduction: str,
    ignore_index: int,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    check_target_range(target, x.shape[1], ignore_index)
    opts = LossOptions(resolve(backend, x), RowOptions(ignore_index=ignore_index), reduction)
    loss, denom = nll_forward(x, target, weight, opts)
    return loss, x.new_empty(_EMPTY, dtype=torch.float64) if denom is None else denom


@_nll_loss.register_fake
def _(x, target, weight, backend, reduction, ignore_index):
    loss = x.new_empty((x.shape[0],) if reduction == "none" else ())
    denom = x.new_empty(() if reduction == "mean" else _EMPTY, dtype=torch.float64)
    return loss, denom


def _nll_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    x, target, weight = inputs[:3]
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(target, weight, output[1])
    ctx.args = inputs[3:]
    ctx.shape, ctx.dtype = tuple(x.shape), x.dtype


def _nll_backward(ctx: Any, g: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
    target, weight, denom = ctx.saved_tensors
    backend, reduction, ii = ctx.args
    nones = (None,) * 5
    if not ctx.needs_input_grad[0]:
        return (None, *nones)
    if torch.is_grad_enabled():  # create_graph
        gx = nll_graph_grad(ctx.shape, ctx.dtype, target, weight, ii, reduction, g)
        return (gx, None, *nones)
    gx = torch.ops.crossent.nll_loss_backward(
        g, target, weight, denom, backend, reduction, ii, ctx.shape[1], ctx.dtype
    )
    return (gx, None, *nones)


_nll_loss.register_autograd(_nll_backward, setup_context=_nll_setup)


@custom_op("crossent::nll_loss_backward", mutates_args=())
def _nll_loss_backward(
    g: Tensor, target: Tensor, weight: Tensor | None, denom: Tensor, backend: str,
    reduction: str, ignore_index: int, num_classes: int, dtype: torch.dtype,
) -> Tensor:  # fmt: skip
    opts = LossOptions(resolve(backend, g), RowOptions(ignore_index=ignore_index), reduction)
    d = denom if reduction == "mean" else None
    out = nll_grad(g, target, weight, d, opts, num_classes, dtype)
    return out.clone() if out._base is not None else out


@_nll_loss_backward.register_fake
def _(g, target, weight, denom, backend, reduction, ignore_index, num_classes, dtype):
    return g.new_empty((target.shape[0], num_classes), dtype=dtype)


def nll_loss(x: Tensor, target: Tensor, weight: Tensor | None, opts: LossOptions) -> Tensor:
    """The compiled form of :class:`crossent._autograd.NllLoss`."""
    loss, _ = torch.ops.crossent.nll_loss(
        x, target, weight, backend_name(opts), opts.reduction, opts.rows.ignore_index
    )
    return loss


# ---- softmax ---------------------------------------------------------------------------------


@custom_op("crossent::softmax", mutates_args=())
def _softmax(x: Tensor, backend: str, log: bool) -> Tensor:
    return resolve(backend, x).softmax_forward(x, log)


@_softmax.register_fake
def _(x, backend, log):
    return x.new_empty(x.shape)


def _softmax_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    ctx.save_for_backward(output)
    ctx.args = inputs[1:]


def _softmax_backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
    (out,) = ctx.saved_tensors
    backend, log = ctx.args
    if torch.is_grad_enabled():  # create_graph
        return softmax_graph_grad(out, g, log), None, None
    return torch.ops.crossent.softmax_backward(g, out, backend, log), None, None


_softmax.register_autograd(_softmax_backward, setup_context=_softmax_setup)


@custom_op("crossent::softmax_backward", mutates_args=())
def _softmax_bwd(g: Tensor, out: Tensor, backend: str, log: bool) -> Tensor:
    return resolve(backend, out).softmax_backward(g.contiguous(), out, log)


@_softmax_bwd.register_fake
def _(g, out, backend, log):
    return out.new_empty(out.shape)


def softmax(x: Tensor, opts: SoftmaxOptions) -> Tensor:
    """The compiled form of :class:`crossent._autograd.Softmax`."""
    return torch.ops.crossent.softmax(x, backend_name(opts), opts.log)


# ---- linear_cross_entropy --------------------------------------------------------------------


def _linear_options(
    backend: str, x: Tensor, reduction: str, rows: RowOptions, chunk_rows: int,
    out_dtype: torch.dtype, compute_dtype: torch.dtype | None, divisor: Tensor | None,
) -> Any:  # fmt: skip
    return LinearOptions(
        backend=resolve(backend, x), rows=rows, reduction=reduction, chunk_rows=chunk_rows,
        out_dtype=out_dtype, compute_dtype=compute_dtype, divisor=divisor,
    )  # fmt: skip


def _fake_param_grads(
    x: Tensor, w: Tensor, b: Tensor | None, compute_dtype: torch.dtype | None,
    need: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    dx = x.new_empty(x.shape, dtype=compute_dtype or x.dtype) if need[0] else x.new_empty(_EMPTY)
    dw = w.new_empty(w.shape) if need[1] else x.new_empty(_EMPTY)
    db = b.new_empty(b.shape) if need[2] and b is not None else x.new_empty(_EMPTY)
    return dx, dw, db


@custom_op("crossent::linear_cross_entropy", mutates_args=())
def _linear_ce(
    x: Tensor, w: Tensor, b: Tensor | None, target: Tensor, weight: Tensor | None,
    divisor: Tensor | None, backend: str, reduction: str, ignore_index: int,
    label_smoothing: float, z_loss: float,
    softcap: float | None, temperature: float, chunk_rows: int, out_dtype: torch.dtype,
    compute_dtype: torch.dtype | None, need_x: bool, need_w: bool, need_b: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    if target.dim() == 1:
        check_target_range(target, w.shape[0], ignore_index)
    rows = _rows(ignore_index, label_smoothing, z_loss, softcap, temperature)
    opts = _linear_options(
        backend, x, reduction, rows, chunk_rows, out_dtype, compute_dtype, divisor
    )
    loss, grads = linear_forward(x, w, b, target, weight, opts, (need_x, need_w, need_b))
    dx, dw, db = (_or_empty(t, x) for t in grads)
    return loss, dx, dw, db


@_linear_ce.register_fake
def _(x, w, b, target, weight, divisor, backend, reduction, *args):
    out_dtype, compute_dtype, need = args[6], args[7], args[8:11]
    loss = x.new_empty((x.shape[0],) if reduction == "none" else (), dtype=out_dtype)
    if reduction == "none":
        return (loss, *(x.new_empty(_EMPTY) for _ in range(3)))
    return (loss, *_fake_param_grads(x, w, b, compute_dtype, need))


def _linear_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*inputs[:6], *output[1:])
    ctx.args = inputs[6:]


def _linear_backward(ctx: Any, g: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
    x, w, b, target, weight, divisor, dx, dw, db = ctx.saved_tensors
    args = ctx.args
    backend, reduction = args[0], args[1]
    rows = _rows(*args[2:7])
    nones = (None,) * 14
    wanted = tuple(bool(n) for n in ctx.needs_input_grad[:5])
    if torch.is_grad_enabled():  # create_graph: a gradient differentiable in its inputs
        chunk, out_dtype, compute_dtype = args[7:10]
        opts = _linear_options(
            backend, x, reduction, rows, chunk, out_dtype, compute_dtype, divisor
        )
        grads = composite_grads((x, w, b, target, weight), g, opts, wanted)
        return (*grads, *nones)
    need = args[10:13]
    grads = (dx, dw, db)
    if reduction == "none":
        grads = torch.ops.crossent.linear_cross_entropy_backward(
            x, w, b, target, weight, g, *args
        )  # reduction='none' takes no divisor
    out: list[Tensor | None] = []
    for t, want, p in zip(grads, (wanted[0] and need[0], wanted[1] and need[1],
                                  wanted[2] and need[2]), (x, w, b), strict=True):  # fmt: skip
        if not want:
            out.append(None)
            continue
        # the eager Function's gradient, cast to its input's dtype as autograd does
        out.append((t if reduction == "none" else scale(t, g)).to(p.dtype))
    return (*out, None, None, *nones)


_linear_ce.register_autograd(_linear_backward, setup_context=_linear_setup)


@custom_op("crossent::linear_cross_entropy_backward", mutates_args=())
def _linear_ce_backward(
    x: Tensor, w: Tensor, b: Tensor | None, target: Tensor, weight: Tensor | None, g: Tensor,
    backend: str, reduction: str, ignore_index: int, label_smoothing: float, z_loss: float,
    softcap: float | None, temperature: float, chunk_rows: int, out_dtype: torch.dtype,
    compute_dtype: torch.dtype | None, need_x: bool, need_w: bool, need_b: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    rows = _rows(ignore_index, label_smoothing, z_loss, softcap, temperature)
    opts = _linear_options(
        backend, x, reduction, rows, chunk_rows, out_dtype, compute_dtype, None
    )
    grads = linear_none_grads(x, w, b, target, weight, g, opts, (need_x, need_w, need_b))
    return tuple(_or_empty(t, x) for t in grads)  # type: ignore[return-value]


@_linear_ce_backward.register_fake
def _(x, w, b, target, weight, g, *args):
    compute_dtype, need = args[9], args[10:13]
    return _fake_param_grads(x, w, b, compute_dtype, need)


def linear_cross_entropy(
    x: Tensor, w: Tensor, b: Tensor | None, target: Tensor, weight: Tensor | None, opts: Any
) -> Tensor:
    """The compiled form of :class:`crossent._linear.LinearCrossEntropy`."""
    grad = opts.grad_enabled
    need = (grad and x.requires_grad, grad and w.requires_grad,
            grad and b is not None and b.requires_grad)  # fmt: skip
    out_dtype = x.dtype if opts.out_dtype is None else opts.out_dtype
    loss, *_ = torch.ops.crossent.linear_cross_entropy(
        x, w, b, target, weight, opts.divisor, backend_name(opts), opts.reduction,
        *_row_args(opts.rows),
        opts.chunk_rows, out_dtype, opts.compute_dtype, *need,
    )  # fmt: skip
    return loss


# ---- token statistics ------------------------------------------------------------------------


def _stats_options(
    like: Tensor, backend: str, ii: int, cap: float | None, temp: float, chunk_rows: int
) -> StatsOptions:
    rows = RowOptions(ignore_index=ii, softcap=cap, temperature=temp)
    return StatsOptions(resolve(backend, like), rows, chunk_rows)


def _fake_stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    m = (x.shape[0],)
    return x.new_empty(m), x.new_empty(m), x.new_empty(m), x.new_empty(m, dtype=torch.int64)


@custom_op("crossent::token_stats", mutates_args=())
def _token_stats(
    x: Tensor, target: Tensor, backend: str, ignore_index: int, softcap: float | None,
    temperature: float, chunk_rows: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    check_target_range(target, x.shape[1], ignore_index)
    opts = _stats_options(x, backend, ignore_index, softcap, temperature, chunk_rows)
    return stats_outputs(None, stats_forward(x, target, opts), x.dtype)


@_token_stats.register_fake
def _(x, target, backend, ignore_index, softcap, temperature, chunk_rows):
    return _fake_stats(x)


def _stats_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.mark_non_differentiable(output[2], output[3])
    n = 2 if len(inputs) == 7 else 4
    ctx.save_for_backward(*inputs[:n])
    ctx.args = inputs[n:]


def _token_stats_backward(ctx: Any, g_lp: Tensor, g_h: Tensor, *_: Any) -> Any:
    x, target = ctx.saved_tensors
    if torch.is_grad_enabled():
        rows = _stats_options(x, *ctx.args).rows
        gx = token_stats_grads((x, target), (g_lp, g_h), rows, (True, False))
        return gx[0], *(None,) * 6
    gx = torch.ops.crossent.token_stats_backward(x, target, g_lp, g_h, *ctx.args)
    return gx, *(None,) * 6


_token_stats.register_autograd(_token_stats_backward, setup_context=_stats_setup)


@custom_op("crossent::token_stats_backward", mutates_args=())
def _token_stats_bwd(
    x: Tensor, target: Tensor, g_lp: Tensor, g_h: Tensor, backend: str, ignore_index: int,
    softcap: float | None, temperature: float, chunk_rows: int,
) -> Tensor:  # fmt: skip
    opts = _stats_options(x, backend, ignore_index, softcap, temperature, chunk_rows)
    return stats_grad(x, target, g_lp, g_h, opts)


@_token_stats_bwd.register_fake
def _(x, target, g_lp, g_h, backend, ignore_index, softcap, temperature, chunk_rows):
    return x.new_empty(x.shape)


def _stats_args(opts: StatsOptions) -> tuple[Any, ...]:
    rows = opts.rows
    return backend_name(opts), rows.ignore_index, rows.softcap, rows.temperature, opts.chunk_rows


def token_stats(x: Tensor, target: Tensor, opts: StatsOptions) -> Any:
    """The compiled form of :class:`crossent._autograd.TokenStatsFunction`."""
    return torch.ops.crossent.token_stats(x, target, *_stats_args(opts))


@custom_op("crossent::linear_token_stats", mutates_args=())
def _linear_token_stats(
    h: Tensor, w: Tensor, b: Tensor | None, target: Tensor, backend: str, ignore_index: int,
    softcap: float | None, temperature: float, chunk_rows: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    check_target_range(target, w.shape[0], ignore_index)
    opts = _stats_options(h, backend, ignore_index, softcap, temperature, chunk_rows)
    return stats_outputs(None, linear_stats_forward(h, w, b, target, opts), h.dtype)


@_linear_token_stats.register_fake
def _(h, w, b, target, backend, ignore_index, softcap, temperature, chunk_rows):
    return _fake_stats(h)


def _linear_token_stats_backward(ctx: Any, g_lp: Tensor, g_h: Tensor, *_: Any) -> Any:
    h, w, b, target = ctx.saved_tensors
    need = tuple(bool(n) for n in ctx.needs_input_grad[:3])
    nones = (None,) * 6
    if torch.is_grad_enabled():
        rows = _stats_options(h, *ctx.args).rows
        grads = token_stats_grads((h, w, b, target), (g_lp, g_h), rows, (*need, False))
        return (*grads, *nones[:5])
    dh, dw, db = torch.ops.crossent.linear_token_stats_backward(
        h, w, b, target, g_lp, g_h, *ctx.args, *need
    )
    return (*(t if n else None for t, n in zip((dh, dw, db), need, strict=True)), *nones)


_linear_token_stats.register_autograd(_linear_token_stats_backward, setup_context=_stats_setup)


@custom_op("crossent::linear_token_stats_backward", mutates_args=())
def _linear_token_stats_bwd(
    h: Tensor, w: Tensor, b: Tensor | None, target: Tensor, g_lp: Tensor, g_h: Tensor,
    backend: str, ignore_index: int, softcap: float | None, temperature: float,
    chunk_rows: int, need_h: bool, need_w: bool, need_b: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    opts = _stats_options(h, backend, ignore_index, softcap, temperature, chunk_rows)
    grads = linear_stats_grads(h, w, b, target, g_lp, g_h, opts, (need_h, need_w, need_b))
    return tuple(_or_empty(t, h) for t in grads)  # type: ignore[return-value]


@_linear_token_stats_bwd.register_fake
def _(h, w, b, target, g_lp, g_h, backend, ignore_index, softcap, temperature, chunk_rows,
      need_h, need_w, need_b):  # fmt: skip
    return _fake_param_grads(h, w, b, None, (need_h, need_w, need_b))


def linear_token_stats(
    h: Tensor, w: Tensor, b: Tensor | None, target: Tensor, opts: StatsOptions
) -> Any:
    """The compiled form of :class:`crossent._linear.LinearTokenStatsFunction`."""
    return torch.ops.crossent.linear_token_stats(h, w, b, target, *_stats_args(opts))
