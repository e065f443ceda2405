"""The numeric primitives every backend implements, on 2-D row blocks.

A *row block* is a ``(M, V)`` tensor: ``M`` rows (samples, tokens, spatial positions) by
``V`` classes, classes contiguous. Everything above the backends (argument checks, legacy
arguments, K-dimensional inputs, reductions, autograd) is written once in
``crossent.functional`` and ``crossent._autograd``; a backend only computes per-row numbers.

Dtypes: logits may be float16, bfloat16, float32 or float64. Per-row results (loss, lse) are
returned in the *accumulation dtype*, :func:`acc_dtype` of the logits: float64 for float64,
float32 otherwise. Gradients are written in the dtype of the buffer the caller passes.

A backend may be asked to write the gradient of the per-row loss into ``grad_out`` during the
forward pass (the fused form: one pass over the logits computes loss and gradient). The
gradient written is ``grad_scale * d(loss_row)/dx`` with exact zeros on ignored rows, so that a
``'mean'`` or ``'sum'`` reduction needs nothing more in backward than a multiplication by the
incoming gradient. ``grad_out`` may alias ``x`` (the logits are overwritten by their
gradient); implementations must read each element before writing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for logits of ``dtype``: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def prob_acc_dtype(x: Tensor, target: Tensor, weight: Tensor | None) -> torch.dtype:
    """float64 when any of logits, target or weight is float64, else float32."""
    dts = [x.dtype, target.dtype] + ([] if weight is None else [weight.dtype])
    return torch.float64 if torch.float64 in dts else torch.float32


@dataclass(frozen=True)
class RowOptions:
    """Per-row options of the cross-entropy primitives.

    ``ignore_index``: rows whose target equals it get loss 0 and gradient 0 (class-index
    targets only). ``label_smoothing``: ``ε`` in ``[0, 1]``; already 0 when the user's value
    was not ``> 0``. Extensions (off by default): the logits are read as
    ``u = softcap·tanh(x / softcap)`` when ``softcap`` is set, then ``u / temperature``; each
    kept row's loss gains ``z_loss·lse(u)²``; ``lse`` is that of ``u``.
    """

    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    temperature: float = 1.0

    @property
    def transformed(self) -> bool:
        """Whether the logits are soft-capped or scaled before the cross entropy."""
        return self.softcap is not None or self.temperature != 1.0

    @property
    def extended(self) -> bool:
        """Whether any extension is on."""
        return self.transformed or self.z_loss != 0.0


def logit_transform(
    x: Tensor, opts: RowOptions, derivative: bool = True
) -> tuple[Tensor, Tensor | None]:
    """The logits as the loss reads them, ``u = softcap·tanh(x / softcap) / temperature``, and
    ``d u / d x`` (when ``derivative``); ``(x, None)`` when neither option is set. Out-of-place
    torch operations, so differentiable and batchable: the portable backend's chunks and the
    composite (torch.func, second-derivative) forms both read the logits through it."""
    if not opts.transformed:
        return x, None
    u, du = x, None
    if opts.softcap is not None:
        th = torch.tanh(x / opts.softcap)
        u = th * opts.softcap
        du = 1.0 - th * th if derivative else None
    if opts.temperature != 1.0:
        u = u / opts.temperature
        if derivative:
            du = torch.full_like(u, 1.0 / opts.temperature) if du is None else du / opts.temperature
    return u, du


# ---- the cross-entropy formula, once --------------------------------------------------------
# With u the logits as read, lse = log Σ_c exp(u_c), ε the label smoothing, V the number of
# classes of the whole row, W = Σ_c w_c and λ the z-loss, a row's class-index loss is
# (1-ε)·nll + (ε/V)·smooth + λ·lse², nll = w_y·(lse - u_y), smooth = Σ_c w_c·(lse - u_c), and
# d loss/d u_j = p_j·a - (ε/V)·w_j - (1-ε)·w_y·[j = y] with a = (1-ε)·w_y + (ε/V)·W + 2λ·lse.


def index_loss(nll: Any, smooth: Any, eps: float, v: int, lse: Any, z_loss: float) -> Any:
    """``(1-ε)·nll + (ε/V)·smooth + λ·lse²`` (``smooth`` unused when ``ε == 0``)."""
    row = nll
    if eps > 0.0:
        row = (1.0 - eps) * row + (eps / v) * smooth
    if z_loss:
        row = row + z_loss * lse * lse
    return row


def index_coef(wt: Any, eps: float, v: int, w_total: Any, lse: Any, z_loss: float) -> Any:
    """``a = (1-ε)·w_y + (ε/V)·Σ_c w_c + 2λ·lse``, the factor of ``p_j`` in d loss / d u_j."""
    a = wt
    if eps > 0.0:
        a = (1.0 - eps) * wt + (eps / v) * w_total
    if z_loss:
        a = a + 2.0 * z_loss * lse
    return a


class RowStats(NamedTuple):
    """Per-row results of a cross-entropy forward: both ``(M,)`` in the accumulation dtype."""

    loss: Tensor
    lse: Tensor


# ---- cross entropy over slices of the classes ---------------------------------------------
# A row's classes may be split into slices (the ranks of a vocabulary-parallel group): each
# slice reports its part of the row's statistics, float64 rows of a (K, M) tensor (see
# Backend.cross_entropy_partial); merge_index / merge_prob combine the parts of every slice,
# in slice order, into the row's loss, lse and gradient factor, the same bits wherever the
# same parts are merged; each slice then writes the gradient of its own columns from those
# (Backend.cross_entropy_partial_grad). A slice's sums are taken relative to its reference
# point: its max where that is finite, else 0 (a slice of -inf logits, or an empty one, then
# adds exact zeros and its Σ w·u stays what torch forms term by term).

INDEX_PARTS = 5  # max, Σ exp(u - ref), u_y (0 off the slice), Σ w·(u - ref), Σ w
PROB_PARTS = 4  # max, Σ exp(u - ref), Σ w t'·(u - ref), Σ w t'


def no_class_parts(k: int, m: int, device: torch.device) -> Tensor:
    """The ``(k, M)`` partial statistics of a slice without classes (and the start of a sum
    over a slice's columns): max -inf, every sum 0."""
    parts = torch.zeros(k, m, dtype=torch.float64, device=device)
    parts[0] = -torch.inf
    return parts


def no_classes(m: int, acc: torch.dtype, device: torch.device) -> RowStats:
    """Rows of a ``(M, 0)`` block: loss 0 (all rows are ignored) and lse = log 0 = -inf."""
    zeros = torch.zeros(m, dtype=acc, device=device)
    return RowStats(zeros, torch.full((m,), -torch.inf, dtype=acc, device=device))


class TokenRows(NamedTuple):
    """Per-row token statistics of ``(M, V)`` logits (see :meth:`Backend.token_stats_forward`):
    the target's log-probability (0 where ignored), the entropy, the log-sum-exp (all three in
    the accumulation dtype) and the argmax (int64), of the logits as read."""

    logprob: Tensor
    entropy: Tensor
    lse: Tensor
    argmax: Tensor

    @staticmethod
    def empty(m: int, acc: torch.dtype, device: torch.device) -> TokenRows:
        """Uninitialised statistics of ``m`` rows."""
        e = [torch.empty(m, dtype=acc, device=device) for _ in range(3)]
        return TokenRows(e[0], e[1], e[2], torch.empty(m, dtype=torch.int64, device=device))


class SliceTargets(NamedTuple):
    """Where a slice ``[start, start + V)`` of the classes meets the rows' class-index targets,
    all ``(M,)``: ``keep`` the rows not ignored, ``mine`` the kept rows whose target is in the
    slice, ``col`` that target's column in the slice (-1 on other rows), ``term`` the factor
    ``(1-ε)·w_y`` of the target's term in the gradient on ``mine`` rows (0 elsewhere)."""

    keep: Tensor
    mine: Tensor
    col: Tensor
    term: Tensor


def slice_targets(
    target: Tensor, weight: Tensor | None, opts: RowOptions, start: int, v: int,
    dtype: torch.dtype,
) -> SliceTargets:  # fmt: skip
    """:class:`SliceTargets` of ``target`` (global indices) for the classes ``[start,
    start + v)``; ``weight``: all the class weights, or ``None``; ``term`` in ``dtype``."""
    keep = target != opts.ignore_index
    mine = keep & (target >= start) & (target < start + v)
    col = torch.where(mine, target - start, -1)
    if weight is None:
        wt = torch.ones(target.shape, dtype=dtype, device=target.device)
    else:
        wt = weight.to(dtype)[torch.where(keep, target, 0)]
    term = torch.where(mine, (1.0 - opts.label_smoothing) * wt, 0.0)
    return SliceTargets(keep, mine, col, term)


class Merged(NamedTuple):
    """Merged per-row statistics, all ``(M,)`` float64: the loss (0 on ignored rows), lse, and
    ``coef``, the factor of ``p_j`` in the gradient (``a`` above; for probability targets
    ``Σ w t' + 2λ·lse``). Rows holding NaN or +inf, or only -inf, are NaN throughout (torch's
    ``log_softmax`` is NaN along them)."""

    loss: Tensor
    lse: Tensor
    coef: Tensor


def reference_point(mx: Tensor) -> Tensor:
    """A slice's reference point: its max where finite, else 0."""
    return torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))


def _merge_common(parts: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(max, log s, shift, bad)`` from ``parts`` ``(R, K, M)``: the row max over every
    slice, log Σ exp(u - max), each slice's ``ref - max`` ``(R, M)`` and the rows that are
    NaN throughout."""
    mx = parts[:, 0]
    m = mx.amax(0)  # NaN where any slice holds NaN
    bad = ~torch.isfinite(m)
    shift = reference_point(mx) - torch.where(bad, torch.zeros_like(m), m)
    s = (parts[:, 1] * torch.exp(shift)).sum(0)
    return m, torch.log(s), shift, bad | torch.isnan(s)


def merge_index(
    parts: Tensor, target: Tensor, weight: Tensor | None, opts: RowOptions, total: int
) -> Merged:
    """Class-index statistics from every slice's :meth:`Backend.cross_entropy_partial`,
    ``parts`` ``(R, INDEX_PARTS, M)`` in slice order; ``weight``: all ``total`` class weights."""
    m, log_s, shift, bad = _merge_common(parts)
    eps = opts.label_smoothing
    keep = target != opts.ignore_index
    tc = torch.where(keep, target, 0)
    wt = torch.ones_like(m) if weight is None else weight.to(torch.float64)[tc]
    w_total = parts[:, 4].sum(0)
    lse = m + log_s
    nll = wt * (log_s - (parts[:, 2].sum(0) - m))
    smooth = None
    if eps > 0.0:  # Σ_c w_c·(lse - u_c) = W·log s - Σ_c w_c·(u_c - max)
        smooth = w_total * log_s - (parts[:, 3] + parts[:, 4] * shift).sum(0)
    loss = index_loss(nll, smooth, eps, total, lse, opts.z_loss)
    coef = index_coef(wt, eps, total, w_total, lse, opts.z_loss)
    nan = torch.full_like(m, torch.nan)
    lse, loss, coef = (torch.where(bad, nan, t) for t in (lse, loss, coef))
    return Merged(loss.masked_fill(~keep, 0.0), lse, coef)


def merge_prob(parts: Tensor, opts: RowOptions) -> Merged:
    """Probability-target statistics from every slice's
    :meth:`Backend.cross_entropy_prob_partial`, ``parts`` ``(R, PROB_PARTS, M)`` in slice
    order: loss ``Σ_c w_c t'_c·(lse - u_c) + λ·lse²``."""
    m, log_s, shift, bad = _merge_common(parts)
    total_wt = parts[:, 3].sum(0)
    lse = m + log_s
    loss = total_wt * log_s - (parts[:, 2] + parts[:, 3] * shift).sum(0)
    coef = total_wt
    if opts.z_loss:
        loss = loss + opts.z_loss * lse * lse
        coef = coef + 2.0 * opts.z_loss * lse
    nan = torch.full_like(m, torch.nan)
    lse, loss, coef = (torch.where(bad, nan, t) for t in (lse, loss, coef))
    return Merged(loss, lse, coef)


class Unsupported(Exception):
    """Raised by a backend's primitive, before it reads or writes anything, for inputs it does
    not take (its class's ``defers`` says which): :mod:`crossent.dispatch` then calls the
    portable torch backend's primitive instead, as its fallback table shows."""


class Backend:
    """Interface of a backend. A backend subclasses this class alone and implements the
    primitives it has; :mod:`crossent.dispatch` gives the portable torch backend's to the
    others (and to inputs its own raise :class:`Unsupported` for).

    Shapes: ``x`` ``(M, V)``; index ``target`` ``(M,)`` int64 already range-checked (every
    value is in ``[0, V)`` or equals ``ignore_index``); probability ``target`` ``(M, V)``
    floating; ``weight`` ``(V,)`` or ``None``.
    """

    name: str = "base"
    # primitive -> the inputs for which it raises Unsupported (for crossent check's table)
    defers: dict[str, str] = {}  # noqa: RUF012
    # whether the backend exchanges data between processes (its results depend on the other
    # ranks: torch.func transforms and torch.compile cannot replay it from one rank's inputs)
    distributed: bool = False
    # whether cross_entropy_columns works in place, with no buffer and no transposition
    columns_in_place: bool = False
    # the linear head's matmul policy (crossent._linear): float32 copies of slices of a 16-bit
    # chunk gradient or weight hold at most this many bytes; every slice costs a few kernel
    # launches, so only a backend whose device runs them cheaply (the CPU) makes them small
    product_slice_bytes: int = 64 * 2**20

    def widened_products(self, dtype: torch.dtype) -> bool:
        """Whether the linear head forms float16/bfloat16 products in float32, slice by slice
        of the weight's rows (the same values: exact products summed in float32, rounded once)
        because this device's 16-bit matmuls are slow. Decided without timing anything."""
        return False

    # whether the linear head sums d(weight) of a bfloat16 parameter in 24 bits (add_narrow)
    narrow_sums: bool = False

    def add_narrow(self, hi: Tensor, lo: Tensor, part: Tensor, first: bool, last: bool) -> None:
        """Add the float32 ``part`` ``(R, D)`` into running sums kept in 24 bits: the upper 16
        of a float32 in ``hi`` (bfloat16) and the next 8 in ``lo`` (uint8), each sum cut back to
        24 bits after the float32 addition by rounding to odd. ``first``: the sums start at
        ``part``; ``last``: ``hi`` receives the sums rounded to nearest bfloat16 from float32
        (and ``lo`` is left alone). Only where :attr:`narrow_sums`."""
        raise NotImplementedError

    def scale_(self, t: Tensor, g: Tensor) -> Tensor:
        """``t`` times the one-element factor ``g``, in place: the backward of a loss whose
        gradient the forward wrote. A backend on a device whose values the host cannot read
        without waiting overrides it to skip the pass when ``g`` is 1, deciding on the
        device."""
        return t.mul_(g.reshape(()))

    def softmax_forward(self, x: Tensor, log: bool) -> Tensor:
        """Return ``softmax(x, -1)`` (or ``log_softmax``), ``(M, V)`` in ``x``'s dtype."""
        raise NotImplementedError

    def softmax_backward(self, grad: Tensor, out: Tensor, log: bool) -> Tensor:
        """Return the gradient of the input of :meth:`softmax_forward` given its output."""
        raise NotImplementedError

    def cross_entropy_forward(
        self,
        x: Tensor,
        target: Tensor,
        weight: Tensor | None,
        opts: RowOptions,
        grad_out: Tensor | None = None,
        grad_scale: Tensor | None = None,
    ) -> RowStats:
        """Per-row cross entropy with class-index targets (optionally writing the gradient).

        ``loss[n] = (1-ε)·w[y]·(lse - x[n,y]) + (ε/V)·Σ_c w_c·(lse - x[n,c])``, 0 where
        ``y == ignore_index``. ``grad_scale`` is a 0-d tensor, or an ``(M,)`` tensor of per-row
        scales (``None`` means 1).
        """
        raise NotImplementedError

    def cross_entropy_prob_forward(
        self,
        x: Tensor,
        target: Tensor,
        weight: Tensor | None,
        opts: RowOptions,
        grad_out: Tensor | None = None,
        grad_scale: Tensor | None = None,
    ) -> RowStats:
        """Per-row cross entropy with probability targets.

        ``t' = (1-ε)·t + ε/V``; ``loss[n] = -Σ_c w_c·t'[n,c]·(x[n,c] - lse)``. Computed in
        float64 if any of ``x``, ``target``, ``weight`` is float64, else float32.
        """
        raise NotImplementedError

    def cross_entropy_prob_extra_grads(
        self,
        x: Tensor,
        target: Tensor,
        weight: Tensor | None,
        lse: Tensor,
        row_grad: Tensor,
        opts: RowOptions,
        want_target: bool,
        want_weight: bool,
    ) -> tuple[Tensor | None, Tensor | None]:
        """Gradients of probability-target cross entropy with respect to target and weight.

        ``row_grad`` ``(M,)`` is the incoming gradient of each row's loss. Returns
        ``(d_target (M, V) in target's dtype, d_weight (V,) in weight's dtype)``, each
        ``None`` when not wanted.
        """
        raise NotImplementedError

    def nll_forward(
        self, x: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int
    ) -> Tensor:
        """Per-row ``-w[y]·x[n, y]``, 0 where ignored, ``(M,)`` in the accumulation dtype."""
        raise NotImplementedError

    def nll_backward(
        self,
        row_grad: Tensor,
        target: Tensor,
        weight: Tensor | None,
        ignore_index: int,
        num_classes: int,
        dtype: torch.dtype,
    ) -> Tensor:
        """Gradient ``(M, V)`` of :meth:`nll_forward`: ``-w[y]·row_grad[n]`` at ``(n, y)``."""
        raise NotImplementedError

    def cross_entropy_partial(
        self, x: Tensor, target: Tensor, weight: Tensor | None, opts: RowOptions, start: int,
        total: int,
    ) -> Tensor:  # fmt: skip
        """This slice's part of the class-index statistics: ``x`` ``(M, V)`` holds the classes
        ``[start, start + V)`` of ``total``; ``target`` (global indices, range-checked against
        ``total``) and ``weight`` (all ``total`` weights, or ``None``) are the whole row's.
        Returns ``(INDEX_PARTS, M)`` float64: the max of u, Σ exp(u - ref), u_y where the
        target is in the slice (else 0), Σ w·(u - ref) (0 without smoothing) and Σ w over the
        slice; ``ref`` as :func:`reference_point`. For :func:`merge_index`."""
        raise NotImplementedError

    def cross_entropy_partial_grad(
        self, x: Tensor, target: Tensor, weight: Tensor | None, opts: RowOptions, start: int,
        total: int, merged: Merged, grad_out: Tensor, grad_scale: Tensor | None = None,
    ) -> None:  # fmt: skip
        """Writes ``grad_scale · d loss / d x`` of this slice's columns into ``grad_out``
        (``x``'s shape; exact zeros on ignored rows), given the statistics merged over every
        slice; arguments as in :meth:`cross_entropy_partial`."""
        raise NotImplementedError

    def cross_entropy_prob_partial(
        self, x: Tensor, target: Tensor, weight: Tensor | None, opts: RowOptions, start: int,
        total: int,
    ) -> Tensor:  # fmt: skip
        """As :meth:`cross_entropy_partial` for probability targets: ``target`` ``(M, V)`` is
        the slice's columns of the targets, ``t' = (1-ε)·t + ε/total``. Returns
        ``(PROB_PARTS, M)`` float64: the max of u, Σ exp(u - ref), Σ w t'·(u - ref), Σ w t'.
        For :func:`merge_prob`."""
        raise NotImplementedError

    def cross_entropy_prob_partial_grad(
        self, x: Tensor, target: Tensor, weight: Tensor | None, opts: RowOptions, start: int,
        total: int, merged: Merged, grad_out: Tensor, grad_scale: Tensor | None = None,
    ) -> None:  # fmt: skip
        """As :meth:`cross_entropy_partial_grad` for probability targets."""
        raise NotImplementedError

    def token_stats_forward(
        self, x: Tensor, target: Tensor, opts: RowOptions, chunk_rows: int
    ) -> TokenRows:
        """Token statistics of the rows of ``x`` (``target`` as for cross entropy; rows whose
        target is ``opts.ignore_index`` get log-probability 0). With u the logits as read and
        p = softmax(u): ``logprob = u_y - lse``, ``entropy = lse - Σ_j p_j·u_j``. A backend
        that holds ``(rows, V)`` temporaries takes at most ``chunk_rows`` rows at a time
        (0: as many as its own budget allows)."""
        raise NotImplementedError

    def token_stats_backward(
        self, x: Tensor, target: Tensor, opts: RowOptions, g_lp: Tensor, g_h: Tensor,
        out: Tensor, chunk_rows: int,
    ) -> None:  # fmt: skip
        """Writes ``d(Σ g_lp·logprob + g_h·entropy) / d x`` into ``out`` (``x``'s shape and
        dtype; it may be ``x`` itself: each row is read before its gradient is written).
        ``g_lp``, ``g_h``: ``(M,)`` in the accumulation dtype. With p, u as above:
        ``d logprob / d u_j = [j = y] - p_j``, ``d entropy / d u_j = -p_j·(u_j - Σ_k p_k u_k)``."""
        raise NotImplementedError

    def cross_entropy_columns(
        self,
        xt: Tensor,
        target: Tensor,
        weight: Tensor | None,
        opts: RowOptions,
        grad_scale: Tensor | None,
        chunk_rows: int,
        want_grad: bool = True,
    ) -> Tensor:
        """:meth:`cross_entropy_forward` of the rows of ``xt.T`` (``xt``: ``(V, M)``, the logits
        of M rows transposed, rows contiguous), the gradient written over ``xt`` when
        ``want_grad``; returns the ``(M,)`` losses. ``grad_scale``: one value or one per row.
        Here: ``chunk_rows`` rows at a time, transposed into a buffer and back (see
        :attr:`columns_in_place`)."""
        v, n = xt.shape
        loss = torch.empty(n, dtype=acc_dtype(xt.dtype), device=xt.device)
        buf = torch.empty((min(chunk_rows, n), v), dtype=xt.dtype, device=xt.device)
        for lo in range(0, n, chunk_rows):
            hi = min(lo + chunk_rows, n)
            rows = buf[: hi - lo]
            rows.copy_(xt[:, lo:hi].t())
            sc = grad_scale
            if sc is not None and sc.numel() > 1:
                sc = sc[lo:hi]
            grad = rows if want_grad else None
            stats = self.cross_entropy_forward(rows, target[lo:hi], weight, opts, grad, sc)
            loss[lo:hi] = stats.loss
            if want_grad:
                xt[:, lo:hi].copy_(rows.t())
        return loss
