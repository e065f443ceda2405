"""Per-token statistics of a softmax over the last dim, without a log-probability tensor:
the target's log-probability, the entropy, the log-sum-exp and the argmax.

What policy-gradient fine-tuning needs (log π(a|s) and an entropy bonus), computed a chunk
of rows at a time. ``token_stats`` reads given logits; ``linear_token_stats`` forms each
chunk's logits from hidden states and a classifier weight and never holds more than one
chunk of them. The log-probability and the entropy are differentiable; backward recomputes
each chunk's probabilities from the saved inputs. CPU logits go through fused kernels
(:mod:`crossent.backends.cpu`: one read for the max, one pass for the exponentials and their
sums, forward and backward; given logits in one call, without chunks); elsewhere plain torch
ops on chunks.

With u the logits as read (``softcap·tanh(x / softcap)``, then divided by ``temperature``),
p = softmax(u):

    logprob = u_y - lse,   entropy = lse - Σ_j p_j u_j,
    d logprob / d u_j = [j = y] - p_j,   d entropy / d u_j = -p_j (u_j - Σ_k p_k u_k).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from . import _composite
from ._linear import add_chunk_grads, chunk_rows, final_grads, logits_into, param_grads
from ._transforms import compiling, composed, differentiable_backward
from .backends import buffers
from .backends.base import RowOptions, acc_dtype
from .backends.torch import chunk_elements, transform


class TokenStats(NamedTuple):
    """Per-token results, each of the target's shape.

    ``logprob``: log-probability of the target (0 where it is ``ignore_index``);
    ``entropy``: entropy of the predicted distribution; ``lse``: log-sum-exp of the logits as
    read; ``argmax``: the most likely class (int64). ``logprob`` and ``entropy`` are
    differentiable.
    """

    logprob: Tensor
    entropy: Tensor
    lse: Tensor
    argmax: Tensor


@dataclass(frozen=True)
class StatsOptions:
    ignore_index: int
    softcap: float | None
    temperature: float
    chunk_rows: int
    grad_enabled: bool = True

    @property
    def rows(self) -> RowOptions:
        return RowOptions(softcap=self.softcap, temperature=self.temperature)


def _fused(x: Tensor) -> bool:
    """Whether the fused CPU kernels take this chunk (CPU rows with at least one class)."""
    return x.device.type == "cpu" and x.shape[1] > 0 and x.shape[0] > 0


def _chunk_stats(
    x: Tensor, target: Tensor, opts: StatsOptions
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Stats of one chunk of logits ``(r, V)`` (any float dtype), in the accumulation dtype."""
    if _fused(x):
        from .backends.cpu import token_stats_forward

        return token_stats_forward(x, target, opts.ignore_index, opts.rows)
    u, _ = transform(x.to(acc_dtype(x.dtype)), opts.rows)
    mx = u.amax(1, keepdim=True)
    z = u - mx  # shifted: the sums below then cancel little
    e = torch.exp(z)
    s = e.sum(1, keepdim=True)
    log_s = torch.log(s)
    p = e.div_(s)
    keep = target != opts.ignore_index
    picked = z.gather(1, torch.where(keep, target, 0).unsqueeze(1))
    logprob = torch.where(keep, (picked - log_s).squeeze(1), 0.0)
    entropy = (log_s - (p * z).sum(1, keepdim=True)).squeeze(1)
    return logprob, entropy, (mx + log_s).squeeze(1), u.argmax(1)


def _chunk_grad(
    x: Tensor, target: Tensor, g_lp: Tensor, g_h: Tensor, opts: StatsOptions,
    overwrite: bool = False,
) -> Tensor:
    """d(Σ g_lp·logprob + g_h·entropy) / d x for one chunk, in x's dtype; with
    ``overwrite`` the fused kernels may write it over ``x`` (each row is read before its
    gradient is written)."""
    if _fused(x):
        from .backends.cpu import token_stats_backward

        # over x, or a reused buffer: no first-touch page faults
        out = x if overwrite and x.is_contiguous() else buffers.empty(x.shape, x.dtype, x.device)
        token_stats_backward(x, target, opts.ignore_index, opts.rows, g_lp, g_h, out)
        return out
    u, du = transform(x.to(acc_dtype(x.dtype)), opts.rows)
    z = u - u.amax(1, keepdim=True)
    e = torch.exp(z)  # recomputed as in forward: exp(z - log Σ) would round twice
    p = e.div_(e.sum(1, keepdim=True))
    mean_z = (p * z).sum(1, keepdim=True)
    keep = target != opts.ignore_index
    g_lp = torch.where(keep, g_lp, 0.0)  # an ignored token's logprob is the constant 0
    g = p * (-(g_lp.unsqueeze(1)) - g_h.unsqueeze(1) * (z - mean_z))
    tc = torch.where(keep, target, 0).unsqueeze(1)
    g.scatter_add_(1, tc, g_lp.unsqueeze(1))
    if du is not None:
        g.mul_(du)
    return g.to(x.dtype)


def _flat_target(
    target: Tensor, data: Tensor, num_classes: int, ignore_index: int, what: str
) -> Tensor:
    """``target`` checked (shape ``data.shape[:-1]``, int64, in range) and flattened."""
    from ._args import check_target_range, dtype_name

    if tuple(target.shape) != tuple(data.shape[:-1]):
        raise ValueError(
            f"expected target of shape {tuple(data.shape[:-1])} ({what}), got {tuple(target.shape)}"
        )
    if target.dtype != torch.int64:
        raise RuntimeError(f"expected target dtype to be Long, but got {dtype_name(target.dtype)}")
    flat = target.reshape(-1)
    check_target_range(flat, num_classes, ignore_index)
    return flat


def _stats(
    m: int,
    dtype: torch.dtype,
    device: torch.device,
    target: Tensor,
    opts: StatsOptions,
    chunk_logits: Callable[[int, int], Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row stats over chunks of rows; ``chunk_logits(lo, hi)`` gives rows ``lo:hi``."""
    acc = acc_dtype(dtype)
    out = [torch.empty(m, dtype=acc, device=device) for _ in range(3)]
    argmax = torch.empty(m, dtype=torch.int64, device=device)
    for lo in range(0, m, opts.chunk_rows):
        hi = min(m, lo + opts.chunk_rows)
        lp, ent, lse, am = _chunk_stats(chunk_logits(lo, hi), target[lo:hi], opts)
        out[0][lo:hi], out[1][lo:hi], out[2][lo:hi], argmax[lo:hi] = lp, ent, lse, am
    return out[0], out[1], out[2], argmax


def _outputs(
    ctx: Any, stats: tuple[Tensor, Tensor, Tensor, Tensor], dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The stats in the input dtype; lse and argmax marked non-differentiable."""
    lp, ent, lse = (t.to(dtype) for t in stats[:3])
    ctx.mark_non_differentiable(lse, stats[3])
    return lp, ent, lse, stats[3]


class TokenStatsFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, target: Tensor, opts: StatsOptions
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if _fused(x):  # the kernels keep no temporaries: all rows in one call
            opts = dataclasses.replace(opts, chunk_rows=x.shape[0])
        stats = stats_forward(x, target, opts)
        ctx.save_for_backward(x, target)
        ctx.opts = opts  # type: ignore[attr-defined]
        return _outputs(ctx, stats, x.dtype)

    @staticmethod
    def backward(ctx: Any, g_lp: Tensor, g_h: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        x, target = ctx.saved_tensors
        opts: StatsOptions = ctx.opts
        if differentiable_backward(g_lp, g_h):
            return (*composite_grads((x, target), (g_lp, g_h), opts, (True, False)), None)
        return stats_grad(x, target, g_lp, g_h, opts), None, None


def stats_forward(
    x: Tensor, target: Tensor, opts: StatsOptions
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`token_stats` of ``(M, V)`` logits, in the accumulation dtype."""
    return _stats(x.shape[0], x.dtype, x.device, target, opts, lambda lo, hi: x[lo:hi])


def stats_grad(x: Tensor, target: Tensor, g_lp: Tensor, g_h: Tensor, opts: StatsOptions) -> Tensor:
    """The gradient of :func:`stats_forward`'s logits for incoming gradients of logprob and
    entropy."""
    acc = acc_dtype(x.dtype)
    g_lp, g_h = g_lp.to(acc), g_h.to(acc)
    if _fused(x):  # one call, straight into the returned buffer
        return _chunk_grad(x, target, g_lp, g_h, opts)
    dx = torch.empty_like(x)
    for lo in range(0, x.shape[0], opts.chunk_rows):
        hi = min(x.shape[0], lo + opts.chunk_rows)
        dx[lo:hi] = _chunk_grad(x[lo:hi], target[lo:hi], g_lp[lo:hi], g_h[lo:hi], opts)
    return dx


def _composite_stats(
    x: Tensor, w: Tensor | None, b: Tensor | None, target: Tensor, opts: StatsOptions
) -> tuple[Tensor, Tensor]:
    logits = x if w is None else torch.nn.functional.linear(x, w, b)
    lp, ent, _, _ = _composite.token_stats(logits, target, opts.ignore_index, opts.rows)
    return lp, ent


def composite_grads(
    inputs: tuple[Tensor | None, ...], grads: tuple[Tensor, Tensor], opts: StatsOptions,
    wanted: tuple[bool, ...],
) -> tuple[Tensor | None, ...]:  # fmt: skip
    """Gradients of the inputs, ``(x, target)`` or ``(h, w, b, target)``, by torch's own
    operations: differentiable (create_graph) and batchable."""

    def stats(*ts: Any) -> tuple[Tensor, Tensor]:
        if len(ts) == 2:
            return _composite_stats(ts[0], None, None, ts[1], opts)
        return _composite_stats(ts[0], ts[1], ts[2], ts[3], opts)

    outs, leaves = _composite.replay(stats, inputs, wanted)
    return _composite.gradients(outs, leaves, grads, wanted)


def _chunk_buffer(h: Tensor, w: Tensor, opts: StatsOptions) -> Tensor:
    rows = min(opts.chunk_rows, max(h.shape[0], 1))
    return torch.empty((rows, w.shape[0]), dtype=h.dtype, device=h.device)


class LinearTokenStatsFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        h: Tensor,
        w: Tensor,
        b: Tensor | None,
        target: Tensor,
        opts: StatsOptions,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        stats = linear_stats_forward(h, w, b, target, opts)
        ctx.save_for_backward(h, w, b, target)  # type: ignore[arg-type]
        ctx.opts = opts  # type: ignore[attr-defined]
        return _outputs(ctx, stats, h.dtype)

    @staticmethod
    def backward(ctx: Any, g_lp: Tensor, g_h: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        h, w, b, target = ctx.saved_tensors
        opts: StatsOptions = ctx.opts
        need = tuple(bool(n) for n in ctx.needs_input_grad[:3])
        if differentiable_backward(g_lp, g_h):
            wanted = (*need, False)
            return (*composite_grads((h, w, b, target), (g_lp, g_h), opts, wanted), None)
        return (*linear_stats_grads(h, w, b, target, g_lp, g_h, opts, need), None, None)


def linear_stats_forward(
    h: Tensor, w: Tensor, b: Tensor | None, target: Tensor, opts: StatsOptions
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`linear_token_stats` of ``(M, D)`` hidden states, in the accumulation dtype."""
    buf = _chunk_buffer(h, w, opts)
    return _stats(
        h.shape[0], h.dtype, h.device, target, opts, lambda lo, hi: logits_into(buf, h[lo:hi], w, b)
    )


def linear_stats_grads(
    h: Tensor, w: Tensor, b: Tensor | None, target: Tensor, g_lp: Tensor, g_h: Tensor,
    opts: StatsOptions, need: tuple[bool, ...],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # fmt: skip
    """Gradients of the hidden states, weight and bias (those in ``need``) for incoming
    gradients of logprob and entropy; each chunk's logits computed again."""
    acc = acc_dtype(h.dtype)
    g_lp, g_h = g_lp.to(acc), g_h.to(acc)
    grads = param_grads(h, w, b, need)  # type: ignore[arg-type]
    buf = _chunk_buffer(h, w, opts)
    for lo in range(0, h.shape[0], opts.chunk_rows):
        hi = min(h.shape[0], lo + opts.chunk_rows)
        logits = logits_into(buf, h[lo:hi], w, b)
        g = _chunk_grad(logits, target[lo:hi], g_lp[lo:hi], g_h[lo:hi], opts, True)
        add_chunk_grads(grads, g, h[lo:hi], w, slice(lo, hi))
    del buf
    return final_grads(grads, w, b)


def stats_options(
    num_classes: int,
    itemsize: int,
    ignore_index: int,
    softcap: Any,
    temperature: Any,
    chunk_bytes: int | None,
    device: torch.device,
) -> StatsOptions:
    from ._args import check_extensions

    _, cap, temp = check_extensions(0.0, softcap, temperature)
    if chunk_bytes is None:
        rows = max(1, chunk_elements(device) // max(1, num_classes))
    else:
        rows = chunk_rows(num_classes, itemsize, chunk_bytes, None)
    return StatsOptions(int(ignore_index), cap, temp, rows, torch.is_grad_enabled())


def token_stats(
    logits: Tensor,
    target: Tensor,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    temperature: float = 1.0,
    chunk_bytes: int | None = None,
) -> TokenStats:
    """Per-token log-probability of ``target``, entropy, log-sum-exp and argmax of a softmax
    over the last dim of ``logits`` ``(..., V)``; ``target`` has the leading shape ``(...)``.

    Args:
        logits (Tensor): ``(..., V)`` floating-point logits.
        target (Tensor): ``(...)`` int64 class indices.
        ignore_index (int, keyword-only): targets equal to it get ``logprob`` 0 (no
            gradient); the other statistics are computed for every token. Default: ``-100``
        softcap (float, keyword-only): read the logits as ``softcap·tanh(x / softcap)``.
            Default: ``None``
        temperature (float, keyword-only): divide the (capped) logits by it. Default: ``1.0``
        chunk_bytes (int, keyword-only): rows are processed in chunks whose float32 copy
            fits this budget. Default: ``None`` (4 MiB)

    Returns:
        :class:`TokenStats` ``(logprob, entropy, lse, argmax)``; the first three in the
        logits' dtype, ``argmax`` int64; ``logprob`` and ``entropy`` differentiable.
    """
    if logits.dim() < 1 or not logits.dtype.is_floating_point:
        raise RuntimeError(
            f"expected floating-point logits with at least 1 dimension, got {logits.dtype} "
            f"of shape {tuple(logits.shape)}"
        )
    v = logits.shape[-1]
    flat_t = _flat_target(
        target, logits, v, ignore_index, "the logits' shape without the class dim"
    )
    opts = stats_options(v, 4, ignore_index, softcap, temperature, chunk_bytes, logits.device)
    x = logits.reshape(-1, v)
    if composed(x):
        outs = _composite.token_stats(x, flat_t, opts.ignore_index, opts.rows)
        return TokenStats(*(o.view(target.shape) for o in outs))
    x = x if x.is_contiguous() else x.contiguous()
    if compiling():
        from . import _ops

        outs = _ops.token_stats(x, flat_t, opts)
    else:
        outs = TokenStatsFunction.apply(x, flat_t, opts)
    return TokenStats(*(o.view(target.shape) for o in outs))


def linear_token_stats(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    temperature: float = 1.0,
    chunk_bytes: int | None = None,
) -> TokenStats:
    """:func:`token_stats` of the logits ``input @ linear_weight.T + linear_bias``, computed
    a chunk of rows at a time: the ``(..., V)`` logits never exist.

    Args:
        input (Tensor): ``(..., D)`` hidden states.
        linear_weight (Tensor): ``(V, D)`` classifier weight.
        target (Tensor): ``(...)`` int64 class indices.
        linear_bias (Tensor, keyword-only): ``(V,)`` bias. Default: ``None``
        ignore_index, softcap, temperature: as in :func:`token_stats`.
        chunk_bytes (int, keyword-only): memory budget of one chunk's logits.
            Default: ``None`` (60 MiB)

    Returns:
        :class:`TokenStats`; ``logprob`` and ``entropy`` differentiable in ``input``,
        ``linear_weight`` and ``linear_bias``.
    """
    if input.dim() < 1 or linear_weight.dim() != 2 or input.shape[-1] != linear_weight.shape[1]:
        raise RuntimeError(
            "expected input (..., D) and linear_weight (V, D), got "
            f"{tuple(input.shape)} and {tuple(linear_weight.shape)}"
        )
    if input.dtype != linear_weight.dtype or (
        linear_bias is not None and linear_bias.dtype != input.dtype
    ):
        raise RuntimeError("expected input, linear_weight and linear_bias of one dtype")
    v, d = linear_weight.shape
    if linear_bias is not None and tuple(linear_bias.shape) != (v,):
        raise RuntimeError(f"expected linear_bias shape {(v,)}, got {tuple(linear_bias.shape)}")
    flat_t = _flat_target(
        target, input, v, ignore_index, "the input's shape without the feature dim"
    )
    from ._linear import DEFAULT_CHUNK_BYTES

    budget = DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    opts = stats_options(
        v, input.element_size(), ignore_index, softcap, temperature, budget, input.device
    )
    h = input.reshape(-1, d)
    if composed(h, linear_weight, linear_bias):
        logits = torch.nn.functional.linear(h, linear_weight, linear_bias)
        outs = _composite.token_stats(logits, flat_t, opts.ignore_index, opts.rows)
        return TokenStats(*(o.view(target.shape) for o in outs))
    h = h if h.is_contiguous() else h.contiguous()
    if compiling():
        from . import _ops

        outs = _ops.linear_token_stats(h, linear_weight, linear_bias, flat_t, opts)
    else:
        outs = LinearTokenStatsFunction.apply(h, linear_weight, linear_bias, flat_t, opts)
    return TokenStats(*(o.view(target.shape) for o in outs))
