"""Fused CPU kernels: softmax, log_softmax and cross entropy on ``(M, V)`` row blocks.

Per row: one pass that evaluates every exponential exactly once and sums them, keeping the
exponentials in a per-thread float scratch row; and one streaming copy of the finished row to
memory (:mod:`._memory`), which skips the read-for-ownership of ordinary stores. Where the
output is an affine map of the exponentials (probabilities, the cross-entropy gradient without
weighted label smoothing) the map is applied during that copy; otherwise one more pass over
the cache-hot scratch row finishes it first. The exponential pass needs the row's max: the
same loop finds the next row's (through integer order keys, see :mod:`._math`), so the next
row's loads from memory overlap this row's arithmetic and, where rows fit in L2, its own pass
reads it from there; only the first row of a thread's block (or one after an ignored row) is
read once more for its max. Softmax's backward of 16-bit rows likewise reads the next row's
two inputs for their dot product while it streams this row's gradient. Rows are spread over
threads with ``prange``.

Sums (of exponentials, dot products) are kept in a fixed number of lanes added up in a fixed
order (:mod:`._lanes`), never reassociated: a result is the same in every compilation of a
kernel, whether compiled in this process or loaded from Numba's cache, on any number of
threads. Fast-math is chosen per loop: reductions allow contraction, ignore the sign of zero
(maxima) and use reciprocals; loops that produce outputs only allow contraction, so their
rounding is that of the formula as written.

Rows containing NaN or +inf, or only -inf, give NaN everywhere (loss, lse, gradient), which is
what torch's ``log_softmax`` produces for them; -inf entries in an otherwise finite row are
exact zeros of the probabilities. Targets are range-checked before any kernel runs: indexing
here is unchecked.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import njit, prange
from numba.core.extending import overload

from ._lanes import lane_loop, lane_max, lane_sum, lanes, load_row, row_key, write_scratch
from ._math import (
    compute_zero,
    exp_for,
    fast_exp,
    fast_tanh,
    fma,
    fmax,
    from_key,
    kmax,
    like,
    load,
    order_key,
    store,
)
from ._memory import (
    LOG_PROBS,
    LOG_SOFTMAX_GRAD,
    SOFTMAX_GRAD,
    fence,
    stream_formula,
    stream_row,
    stream_row_affine,
    stream_softmax_grad,
    wide_vectors,
)

# Never "reassoc": a reassociated sum is added up in whatever order each compilation picks,
# and Numba compiles a helper again inside every kernel that calls it (see _lanes).
FM_REDUCE = {"nsz", "contract", "arcp"}
FM_WRITE = {"contract"}

BLOCK = 1024  # elements per step of the exp-and-sum loop: its float32 sum stays short
LINE = 64  # bytes per cache line


# ---- row helpers ------------------------------------------------------------------------
# Sums accumulate per block in the compute dtype (LANES lanes of at most BLOCK/64 terms each)
# and across blocks in float64, then round to the compute dtype once: float32 sums over
# V = 262144 terms stay within the tolerance rule. Reductions start from element 0 (V >= 1).


@njit(fastmath=FM_REDUCE, cache=True)
def _row_max(xr):
    """Max of a row (maxNum: NaNs are skipped here and caught by the sum of exponentials)."""
    wide_vectors()
    m = load(xr, 0)
    for j in range(1, xr.shape[0]):
        m = fmax(m, load(xr, j))
    return m


@njit(fastmath=FM_REDUCE, cache=True, inline="always")
def _exp_sum_step(j, lane, acc, args):
    xr, m, e, xn = args
    v = exp_for(xr, load_row(xr, j) - m)
    write_scratch(e, j, v)
    acc[0][lane] += v
    acc[1][lane] = kmax(acc[1][lane], row_key(xn, j))


@njit(fastmath=FM_REDUCE, cache=True)
def _exp_sum_block(xr, m, e, xn, k):
    """``e[j] = exp(x[j] - m)`` (the one exponential of each element) and their sum; also the
    max of ``k`` and the order keys of ``xn`` (the same block of the next row)."""
    wide_vectors()
    main, tail = (lanes(like(0, m)), lanes(k)), (lanes(like(0, m)), lanes(k))
    lane_loop(xr.shape[0], _exp_sum_step, main, tail, (xr, m, e, xn))
    return lane_sum(main[0], tail[0]), lane_max(main[1], tail[1])


# ---- transformed logits (soft-capping, temperature) --------------------------------------
# Functions evaluating tanh use NumPy's error model: its division, (1 - e)/(1 + e), never has
# a zero divisor, and Python's model would put a (vectorisation-blocking) check on it.
# u = cap·tanh(x/cap)·(1/T) when cap > 0, else x·(1/T); both increasing in x, so the row's max
# of u is u(max x). d u/d x = (1/T)·(1 - tanh²(x/cap)) with a cap, else the constant 1/T, which
# the gradient's affine map absorbs.


@njit(fastmath=FM_REDUCE, cache=True, inline="always")
def _exp_sum_only_step(j, lane, acc, args):
    xr, m, xn = args
    acc[0][lane] += exp_for(xr, load_row(xr, j) - m)
    acc[1][lane] = kmax(acc[1][lane], row_key(xn, j))


@njit(fastmath=FM_REDUCE, cache=True)
def _exp_sum_only_block(xr, m, xn, k):
    """``Σ exp(x[j] - m)`` over a block, the exponentials not kept; next row's keys as above."""
    wide_vectors()
    main, tail = (lanes(like(0, m)), lanes(k)), (lanes(like(0, m)), lanes(k))
    lane_loop(xr.shape[0], _exp_sum_only_step, main, tail, (xr, m, xn))
    return lane_sum(main[0], tail[0]), lane_max(main[1], tail[1])


@njit(cache=True, error_model="numpy")
def _u(xv, cap, inv_cap, inv_t):
    return (cap * fast_tanh(xv * inv_cap) if cap > 0 else xv) * inv_t


@njit(cache=True, error_model="numpy")
def _du_dx(xv, inv_cap, inv_t):
    """d u/d x with a cap: (1/T)·(1 - tanh²(x/cap))."""
    th = fast_tanh(xv * inv_cap)
    return inv_t * (like(1, th) - th * th)


@njit(fastmath=FM_REDUCE, cache=True, error_model="numpy", inline="always")
def _exp_sum_cap_step(j, lane, acc, args):
    xr, m, e, cap, inv_cap, inv_t, xn = args
    v = exp_for(xr, cap * fast_tanh(load_row(xr, j) * inv_cap) * inv_t - m)
    write_scratch(e, j, v)
    acc[0][lane] += v
    acc[1][lane] = kmax(acc[1][lane], row_key(xn, j))


@njit(fastmath=FM_REDUCE, cache=True, error_model="numpy")
def _exp_sum_block_cap(xr, m, e, cap, inv_cap, inv_t, xn, k):
    """As :func:`_exp_sum_block` for soft-capped (and scaled) logits."""
    wide_vectors()
    main, tail = (lanes(like(0, m)), lanes(k)), (lanes(like(0, m)), lanes(k))
    lane_loop(xr.shape[0], _exp_sum_cap_step, main, tail, (xr, m, e, cap, inv_cap, inv_t, xn))
    return lane_sum(main[0], tail[0]), lane_max(main[1], tail[1])


@njit(fastmath=FM_REDUCE, cache=True, inline="always")
def _exp_sum_scaled_step(j, lane, acc, args):
    xr, m, e, inv_t, xn = args
    v = exp_for(xr, load_row(xr, j) * inv_t - m)
    write_scratch(e, j, v)
    acc[0][lane] += v
    acc[1][lane] = kmax(acc[1][lane], row_key(xn, j))


@njit(fastmath=FM_REDUCE, cache=True)
def _exp_sum_block_scaled(xr, m, e, inv_t, xn, k):
    """As :func:`_exp_sum_block` for logits divided by a temperature."""
    wide_vectors()
    main, tail = (lanes(like(0, m)), lanes(k)), (lanes(like(0, m)), lanes(k))
    lane_loop(xr.shape[0], _exp_sum_scaled_step, main, tail, (xr, m, e, inv_t, xn))
    return lane_sum(main[0], tail[0]), lane_max(main[1], tail[1])


@njit(fastmath=FM_REDUCE, cache=True, error_model="numpy", inline="always")
def _shifted_cap_step(j, lane, acc, args):
    xr, m, w, has_w, cap, inv_cap, inv_t = args
    z = cap * fast_tanh(load(xr, j) * inv_cap) * inv_t - m
    acc[0][lane] += np.float64(w[j] * z if has_w else z)


@njit(fastmath=FM_REDUCE, cache=True, inline="always")
def _shifted_scaled_step(j, lane, acc, args):
    xr, m, w, has_w, inv_t = args
    z = load(xr, j) * inv_t - m
    acc[0][lane] += np.float64(w[j] * z if has_w else z)


@njit(fastmath=FM_REDUCE, cache=True, error_model="numpy")
def _shifted_sum_t(xr, m, w, has_w, cap, inv_cap, inv_t):
    """``Σ_j w_j·(u_j - m)`` (``w_j = 1`` without weights)."""
    wide_vectors()
    s, t = lanes(0.0), lanes(0.0)
    n = xr.shape[0]
    if cap > 0:  # the transform written out in each loop, so that both vectorise
        lane_loop(n, _shifted_cap_step, (s,), (t,), (xr, m, w, has_w, cap, inv_cap, inv_t))
    else:
        lane_loop(n, _shifted_scaled_step, (s,), (t,), (xr, m, w, has_w, inv_t))
    return like(lane_sum(s, t), m)


@njit(fastmath=FM_WRITE, cache=True, error_model="numpy")
def _cap_grad(e, xr, a, b, w, has_w, cap, inv_cap, inv_t):
    """``e[j] = (e[j]·a - b·w_j)·(1/T)·(1 - tanh²(x_j/cap))`` in place."""
    wide_vectors()
    for j in range(e.shape[0]):
        th = fast_tanh(load(xr, j) * inv_cap)
        e[j] = (e[j] * a - (b * w[j] if has_w else b)) * (inv_t * (like(1, th) - th * th))


@functools.cache
def _exp_sum_row(transform: int, keep: bool = True):
    """``exp_sum(xr, m, e, nxt, cap, inv_cap, inv_t) -> (s, max of row nxt)``: the
    exponentials of a row's logits, transformed by ``transform`` (as in
    :func:`ce_index_kernel`; ``m`` is the max of the transformed row), into ``e`` and their sum
    (NaN if the row holds NaN), and the max of row ``nxt`` (as :func:`_row_max`, except that it
    may be a NaN where the row holds one), read in the same loop: its loads from memory overlap
    the exponentials' arithmetic. Without ``keep`` (plain logits only) the exponentials are
    summed, not stored. Compiled with only that set's code; made once per process for each
    set."""
    capped = transform == 2
    scaled = transform == 1
    only_sum = not keep and transform == 0

    @njit(cache=True)
    def exp_sum(xr, m, e, nxt, cap, inv_cap, inv_t):
        v = xr.shape[0]
        s = 0.0
        k = order_key(nxt, 0)
        for lo in range(0, v, BLOCK):
            hi = min(lo + BLOCK, v)
            if capped:
                b, k = _exp_sum_block_cap(
                    xr[lo:hi], m, e[lo:hi], cap, inv_cap, inv_t, nxt[lo:hi], k
                )
            elif scaled:
                b, k = _exp_sum_block_scaled(xr[lo:hi], m, e[lo:hi], inv_t, nxt[lo:hi], k)
            elif only_sum:
                b, k = _exp_sum_only_block(xr[lo:hi], m, nxt[lo:hi], k)
            else:
                b, k = _exp_sum_block(xr[lo:hi], m, e[lo:hi], nxt[lo:hi], k)
            s += b
        return like(s, m), from_key(nxt, k)

    return exp_sum


@njit(inline="always", cache=True)
def _next_row(x, i, last):
    """The row whose max the exponential pass of row ``i`` finds, and whether it is the next
    one: row ``i`` itself when that is the last of the block (its max found again)."""
    return x[min(i + 1, last)], i < last


@njit(fastmath=FM_REDUCE, cache=True, inline="always")
def _shifted_step(j, lane, acc, args):
    xr, m = args
    acc[0][lane] += np.float64(load(xr, j) - m)


@njit(fastmath=FM_REDUCE, cache=True)
def _shifted_sum(xr, m):
    """``Σ_j (x[j] - m)``."""
    wide_vectors()
    s, t = lanes(0.0), lanes(0.0)
    lane_loop(xr.shape[0], _shifted_step, (s,), (t,), (xr, m))
    return like(lane_sum(s, t), m)


@njit(fastmath=FM_REDUCE, cache=True, inline="always")
def _shifted_wstep(j, lane, acc, args):
    xr, m, w = args
    acc[0][lane] += np.float64(w[j] * (load(xr, j) - m))


@njit(fastmath=FM_REDUCE, cache=True)
def _shifted_wsum(xr, m, w):
    """``Σ_j w[j]·(x[j] - m)`` (a zero weight on a -inf logit gives NaN, as in torch)."""
    wide_vectors()
    s, t = lanes(0.0), lanes(0.0)
    lane_loop(xr.shape[0], _shifted_wstep, (s,), (t,), (xr, m, w))
    return like(lane_sum(s, t), m)


@njit(fastmath=FM_WRITE, cache=True)
def _waffine(e, a, b, w):
    """``e[j] = e[j]·a - b·w[j]`` in place."""
    wide_vectors()
    for j in range(e.shape[0]):
        e[j] = e[j] * a - b * w[j]


@njit(cache=True)
def _fill(g, value):
    for j in range(g.shape[0]):
        store(g, j, value)


@njit(inline="always", cache=True)
def _bad(m, s):
    """A row holding NaN or +inf, or only -inf: torch's log_softmax is NaN all along it."""
    return s != s or m == math.inf or m == -math.inf


@njit(inline="always", cache=True)
def _nblocks(m, per_block):
    return max(1, min(m, (m + per_block - 1) // per_block))


# ---- cross entropy, class-index targets -------------------------------------------------


@njit(cache=True, error_model="numpy")
def _smoothing_terms(xr, m, log_s, w, cap, inv_cap, inv_t):
    """``Σ_j w_j·(log s - z_j)``, term by term as torch sums them: with an inf weight each
    term is inf or NaN by itself (``log s - z_j >= 0``), where ``W·log s - Σ_j w_j z_j`` would
    give inf - inf. Used only when the weights' total is not finite."""
    s = 0.0
    for j in range(xr.shape[0]):
        s += np.float64(w[j] * (log_s - (_u(load(xr, j), cap, inv_cap, inv_t) - m)))
    return like(s, m)


@njit(cache=True, error_model="numpy")
def _smoothing_terms_col(x, i, m, log_s, w, cap, inv_cap, inv_t):
    """As :func:`_smoothing_terms` down column ``i`` of ``x``."""
    s = 0.0
    for r in range(x.shape[0]):
        s += np.float64(w[r] * (log_s - (_u(load(x[r], i), cap, inv_cap, inv_t) - m)))
    return like(s, m)


def ce_index_kernel(smoothing: bool, transform: int, z_loss: bool):  # noqa: C901
    """The class-index cross-entropy kernel for one set of options, fixed when it is compiled:
    label ``smoothing`` on, ``transform`` (0: plain logits, 1: a temperature, 2: soft-capped,
    with or without a temperature), a ``z_loss``. The code of every option that is off is cut
    before Numba types the kernel, so a call compiles only what it runs; each set is cached on
    disk apart (Numba keys a closure's cache entries by the values it closes over).

    The kernel: cross entropy with class indices over rows of ``x`` (see ``row`` below);
    ``scales`` holds one gradient scale for every row, or one per row; ``cap`` (0: none),
    ``inv_cap`` and ``inv_t`` transform the logits. Reads M·V·b bytes of logits (plus
    cache-hot re-reads), streams M·V·b of gradient.
    """
    capped = transform == 2
    transformed = transform != 0
    exp_sum = _exp_sum_row(transform)

    @njit(cache=True)
    def row(
        xr, mx, y, w, has_w, w_total, c_t, c_s, z_loss_value, scale, e, nxt, g, want_grad, nt,
        cap, inv_cap, inv_t,
    ):
        """One row, whose max is ``mx``: returns ``(loss, lse, max of row nxt)`` and, if
        ``want_grad``, writes ``scale·d loss/d x``.

        With u the logits as read (x, or transformed: see :func:`_u`), z = u - max u,
        s = Σ exp(z), c_t = 1-ε, c_s = ε/V, W = Σ_c w_c and λ = z_loss:
        loss = c_t·w_y·(log s - z_y) + c_s·Σ_c w_c·(log s - z_c) + λ·lse²;
        d loss/d u_j = p_j·(c_t·w_y + c_s·W + 2λ·lse) - c_s·w_j - c_t·w_y·[j = y],
        times d u_j/d x_j for the gradient of x.
        """
        v = xr.shape[0]
        m = mx
        if transformed:
            m = _u(mx, cap, inv_cap, inv_t)
        one = like(1, m)
        wy = w[y] if has_w else one
        wt = w_total if has_w else like(v, m)
        neg_wz = like(0, m)
        if smoothing:
            if transformed:
                neg_wz = -_shifted_sum_t(xr, m, w, has_w, cap, inv_cap, inv_t)
            elif has_w:  # -Σ_c w_c z_c; the W·log s part is added below
                neg_wz = -_shifted_wsum(xr, m, w)
            else:
                neg_wz = -_shifted_sum(xr, m)
        # read before the gradient may overwrite the row (in-place mode)
        xy = load(xr, y)
        zy = xy - m
        if transformed:
            zy = _u(xy, cap, inv_cap, inv_t) - m
        s, m_next = exp_sum(xr, m, e, nxt, cap, inv_cap, inv_t)
        if _bad(m, s):
            if want_grad:
                _fill(g, math.nan)
            return math.nan, math.nan, m_next
        log_s = like(math.log(s), m)
        lse = m + log_s
        loss = c_t * wy * (log_s - zy)
        if smoothing:
            if math.isfinite(wt):
                loss += c_s * (wt * log_s + neg_wz)
            else:  # an inf or NaN class weight: each term as torch forms it
                loss += c_s * _smoothing_terms(xr, m, log_s, w, cap, inv_cap, inv_t)
        if z_loss:
            loss += z_loss_value * lse * lse
        if want_grad:
            # without smoothing the class weights' total takes no part (an inf or NaN weight
            # of a class no target uses leaves the gradient finite, as in torch)
            ws = like(0, m)
            if smoothing:
                ws = c_s * wt
            a = like(scale * (c_t * wy + ws + 2 * z_loss_value * lse) / s, m)
            b = like(scale * c_s, m)
            c = like(scale * c_t * wy, m)
            if capped:  # a factor per element: finished in the scratch row
                _cap_grad(e, xr, a, b, w, has_w, cap, inv_cap, inv_t)
                e[y] -= c * _du_dx(xy, inv_cap, inv_t)
                stream_row(e, g, nt)
                return loss, lse, m_next
            a, b, c = a * inv_t, b * inv_t, c * inv_t  # 1/T folds into the affine map
            if smoothing:
                if has_w:
                    _waffine(e, a, b, w)
                    e[y] -= c
                    stream_row(e, g, nt)
                    return loss, lse, m_next
            # the affine map is applied while streaming; element y is finished here
            e[y] = fma(e[y], a, -b) - c
            stream_row_affine(e, g, a, b, y, y + 1, nt)
        return loss, lse, m_next

    @njit(parallel=True, cache=True)
    def kernel(
        x, target, w, has_w, w_total, ignore_index, c_t, c_s, z_loss_value, scales, loss, lse,
        grad, want_grad, nt, cap, inv_cap, inv_t,
    ):
        m_rows, v = x.shape
        nb = _nblocks(m_rows, 8)
        for b in prange(nb):
            e = np.empty(v, dtype=loss.dtype)
            last = (b + 1) * m_rows // nb - 1
            mx, known = compute_zero(x), False  # row i's max when known (found with row i - 1)
            for i in range(b * m_rows // nb, last + 1):
                y = target[i]
                if y == ignore_index:
                    loss[i] = 0
                    lse[i] = math.nan  # not computed for ignored rows
                    if want_grad:
                        _fill(grad[i], 0.0)
                    known = False
                    continue
                nxt, ahead = _next_row(x, i, last)
                g = grad[i]  # an empty row when no gradient is wanted
                scale = scales[i] if scales.shape[0] > 1 else scales[0]
                loss[i], lse[i], m_next = row(
                    x[i], mx if known else _row_max(x[i]), y, w, has_w, w_total, c_t, c_s,
                    z_loss_value, scale, e, nxt, g, want_grad, nt, cap, inv_cap, inv_t,
                )
                mx, known = m_next, ahead
            fence()

    return kernel


# ---- cross entropy over a slice of the classes -------------------------------------------
# The partial statistics of backends/base.py (Backend.cross_entropy_partial) and the gradient
# given the merged ones, for class-index targets: the rows of x hold the classes
# [start, start + V) of the whole vocabulary.


def ce_partial_kernel(smoothing: bool, transform: int):
    """This slice's partial statistics of every row, for one set of options (as in
    :func:`ce_index_kernel`)::

        kernel(x, target, ignore_index, start, w, has_w, w_total, proto, cap, inv_cap, inv_t,
               parts)

    ``parts`` ``(5, M)`` float64 receives per row: the max of u, Σ exp(u - ref) (ref: the max
    where finite, else 0), u_y where the target is among this slice's classes (else 0),
    Σ w·(u - ref) with smoothing (else 0) and ``w_total`` (Σ w over the slice). Ignored rows
    get (-inf, 0, 0, 0, w_total): they take no part in the loss. One pass over each row.
    """
    transformed = transform != 0
    exp_sum = _exp_sum_row(transform, keep=False)  # the exponentials only summed

    @njit(parallel=True, cache=True)
    def kernel(
        x, target, ignore_index, start, w, has_w, w_total, proto, cap, inv_cap, inv_t, parts
    ):
        m_rows, v = x.shape
        nb = _nblocks(m_rows, 8)
        for b in prange(nb):
            e = np.empty(v, dtype=proto.dtype)
            last = (b + 1) * m_rows // nb - 1
            mx, known = compute_zero(x), False  # row i's max when known (found with row i - 1)
            for i in range(b * m_rows // nb, last + 1):
                parts[4, i] = w_total
                y = target[i]
                if y == ignore_index:
                    parts[0, i] = -math.inf
                    parts[1, i] = parts[2, i] = parts[3, i] = 0.0
                    known = False
                    continue
                xr = x[i]
                nxt, ahead = _next_row(x, i, last)
                m = mx if known else _row_max(xr)
                if transformed:
                    m = _u(m, cap, inv_cap, inv_t)
                ref = m if math.isfinite(m) else like(0, m)
                s, mx = exp_sum(xr, ref, e, nxt, cap, inv_cap, inv_t)
                known = ahead
                parts[0, i] = m
                parts[1, i] = s
                yl = y - start
                parts[2, i] = 0.0
                if 0 <= yl < v:
                    xy = load(xr, yl)
                    parts[2, i] = _u(xy, cap, inv_cap, inv_t) if transformed else xy
                parts[3, i] = 0.0
                if smoothing:
                    if transformed:
                        parts[3, i] = _shifted_sum_t(xr, ref, w, has_w, cap, inv_cap, inv_t)
                    elif has_w:
                        parts[3, i] = _shifted_wsum(xr, ref, w)
                    else:
                        parts[3, i] = _shifted_sum(xr, ref)

    return kernel


@njit(fastmath=FM_WRITE, cache=True)
def _exps(xr, m, e):
    """``e[j] = exp(x[j] - m)``: no sum, no next row."""
    wide_vectors()
    for j in range(xr.shape[0]):
        e[j] = exp_for(xr, load(xr, j) - m)


def ce_partial_grad_kernel(smoothing: bool, transform: int):
    """The gradient of this slice's columns given the merged statistics, for one set of options
    (as in :func:`ce_index_kernel`)::

        kernel(x, col, keep, lse, a, b, c, w, has_w, grad, nt, cap, inv_cap, inv_t)

    Per row ``i``: ``grad = (p_j·a_i - b_i·w_j)·(d u_j/d x_j)``, less ``c_i·(d u_y/d x_y)`` at
    column ``col[i]`` (the target's column in this slice, -1 when it is elsewhere), with
    ``p_j = exp(u_j - lse_i)``; exact zeros where ``keep[i]`` is false. ``a``, ``b``, ``c`` already
    hold the row's gradient scale. One pass over each row, the gradient streamed.
    """
    capped = transform == 2
    transformed = transform != 0
    exp_sum = _exp_sum_row(transform)

    @njit(parallel=True, cache=True)
    def kernel(x, col, keep, lse, a, b, c, w, has_w, grad, nt, cap, inv_cap, inv_t):
        m_rows, v = x.shape
        nb = _nblocks(m_rows, 8)
        for blk in prange(nb):
            e = np.empty(v, dtype=lse.dtype)
            last = (blk + 1) * m_rows // nb - 1
            for i in range(blk * m_rows // nb, last + 1):
                g = grad[i]
                if not keep[i]:
                    _fill(g, 0.0)
                    continue
                xr = x[i]
                if transformed:
                    exp_sum(xr, lse[i], e, xr, cap, inv_cap, inv_t)
                else:
                    _exps(xr, lse[i], e)
                yl = col[i]
                xy = load(xr, yl) if yl >= 0 else like(0, lse[i])  # before g may overwrite it
                if capped:  # a factor per element: finished in the scratch row
                    _cap_grad(e, xr, a[i], b[i], w, has_w, cap, inv_cap, inv_t)
                    if yl >= 0:
                        e[yl] -= c[i] * _du_dx(xy, inv_cap, inv_t)
                    stream_row(e, g, nt)
                    continue
                ai, bi, ci = a[i] * inv_t, b[i] * inv_t, c[i] * inv_t
                if smoothing and has_w:
                    _waffine(e, ai, bi, w)
                    if yl >= 0:
                        e[yl] -= ci
                    stream_row(e, g, nt)
                elif yl >= 0:
                    e[yl] = fma(e[yl], ai, -bi) - ci
                    stream_row_affine(e, g, ai, bi, yl, yl + 1, nt)
                else:
                    stream_row_affine(e, g, ai, bi, 0, 0, nt)
            fence()

    return kernel


# ---- cross entropy, probability targets -------------------------------------------------


@njit(fastmath=FM_REDUCE, cache=True, inline="always")
def _prob_weight(j, tr, w, has_w, c_t, c_s):
    """``w_j t'_j`` as a float64."""
    tj = c_t * load(tr, j) + c_s
    return np.float64(tj * w[j] if has_w else tj)


@njit(fastmath=FM_REDUCE, cache=True, error_model="numpy", inline="always")
def _prob_dots_cap_step(j, lane, acc, args):
    xr, tr, m, log_s, w, has_w, c_t, c_s, cap, inv_cap, inv_t = args
    z = np.float64(cap * fast_tanh(load(xr, j) * inv_cap) * inv_t) - np.float64(m)
    tj = _prob_weight(j, tr, w, has_w, c_t, c_s)
    acc[0][lane] += tj
    acc[1][lane] += tj * (np.float64(log_s) - z)


@njit(fastmath=FM_REDUCE, cache=True, inline="always")
def _prob_dots_step(j, lane, acc, args):
    xr, tr, m, log_s, w, has_w, c_t, c_s, inv_t = args
    z = np.float64(load(xr, j)) * np.float64(inv_t) - np.float64(m)
    tj = _prob_weight(j, tr, w, has_w, c_t, c_s)
    acc[0][lane] += tj
    acc[1][lane] += tj * (np.float64(log_s) - z)


@njit(fastmath=FM_REDUCE, cache=True)
def _prob_dots(xr, tr, m, log_s, w, has_w, c_t, c_s, inv_t):
    """``(Σ_j w_j t'_j, Σ_j w_j t'_j (log s - z_j))`` with ``t' = c_t·t + c_s`` and
    ``z = x/T - m``. Each term is torch's, a weight times ``-log p_j >= 0``: an inf weight gives
    an inf loss, never inf - inf. z in float64 (exact for float32 logits at T = 1, however far
    from the max)."""
    wide_vectors()
    main, tail = (lanes(0.0), lanes(0.0)), (lanes(0.0), lanes(0.0))
    args = (xr, tr, m, log_s, w, has_w, c_t, c_s, inv_t)
    lane_loop(xr.shape[0], _prob_dots_step, main, tail, args)
    return like(lane_sum(main[0], tail[0]), m), like(lane_sum(main[1], tail[1]), m)


@njit(fastmath=FM_REDUCE, cache=True, error_model="numpy")
def _prob_dots_cap(xr, tr, m, log_s, w, has_w, c_t, c_s, cap, inv_cap, inv_t):
    """As :func:`_prob_dots` for soft-capped (and scaled) logits."""
    wide_vectors()
    main, tail = (lanes(0.0), lanes(0.0)), (lanes(0.0), lanes(0.0))
    args = (xr, tr, m, log_s, w, has_w, c_t, c_s, cap, inv_cap, inv_t)
    lane_loop(xr.shape[0], _prob_dots_cap_step, main, tail, args)
    return like(lane_sum(main[0], tail[0]), m), like(lane_sum(main[1], tail[1]), m)


@njit(fastmath=FM_WRITE, cache=True)
def _prob_grad(e, tr, w, has_w, c_t, c_s, a, b):
    """``e[j] = e[j]·a - b·w_j·t'_j`` in place."""
    wide_vectors()
    for j in range(e.shape[0]):
        tj = c_t * load(tr, j) + c_s
        if has_w:
            tj = tj * w[j]
        e[j] = e[j] * a - b * tj


@njit(fastmath=FM_WRITE, cache=True, error_model="numpy")
def _prob_grad_cap(e, tr, xr, w, has_w, c_t, c_s, a, b, inv_cap, inv_t):
    """``e[j] = (e[j]·a - b·w_j·t'_j)·(1/T)·(1 - tanh²(x_j/cap))`` in place."""
    wide_vectors()
    for j in range(e.shape[0]):
        tj = c_t * load(tr, j) + c_s
        if has_w:
            tj = tj * w[j]
        th = fast_tanh(load(xr, j) * inv_cap)
        e[j] = (e[j] * a - b * tj) * (inv_t * (like(1, th) - th * th))


def ce_prob_kernel(transform: int):
    """Cross entropy with probability targets for one ``transform`` of the logits (as in
    :func:`ce_index_kernel`), compiled with only that transform's code::

        kernel(x, t, w, has_w, c_t, c_s, z_loss, scales, loss, lse, grad, want_grad, nt,
               cap, inv_cap, inv_t)

    Reads x and t once each, streams the gradient; ``scales`` and the transform as in
    :func:`ce_index_kernel`.
    """
    capped = transform == 2
    transformed = transform != 0
    exp_sum = _exp_sum_row(transform)

    @njit(cache=True)
    def row(
        xr, mx, tr, w, has_w, c_t, c_s, z_loss, scale, e, nxt, g, want_grad, nt, cap, inv_cap,
        inv_t,
    ):
        """One row, whose max is ``mx``: returns ``(loss, lse, max of row nxt)``; with u the
        logits as read (see :func:`_u`), z = u - max u:
        loss = Σ_j w_j t'_j (log s - z_j) + λ·lse²;
        d loss/d u_j = p_j·(Σ w t' + 2λ·lse) - w_j t'_j, times d u_j/d x_j."""
        m = _u(mx, cap, inv_cap, inv_t) if transformed else mx
        s, m_next = exp_sum(xr, m, e, nxt, cap, inv_cap, inv_t)
        if _bad(m, s):
            if want_grad:
                _fill(g, math.nan)
            return math.nan, math.nan, m_next
        log_s = like(math.log(s), m)
        lse = m + log_s
        if capped:
            total, dot = _prob_dots_cap(xr, tr, m, log_s, w, has_w, c_t, c_s, cap, inv_cap, inv_t)
        else:
            total, dot = _prob_dots(xr, tr, m, log_s, w, has_w, c_t, c_s, inv_t)
        if want_grad:
            a = like(scale * (total + 2 * z_loss * lse) / s, m)
            if capped:
                _prob_grad_cap(e, tr, xr, w, has_w, c_t, c_s, a, scale, inv_cap, inv_t)
            else:
                _prob_grad(e, tr, w, has_w, c_t, c_s, a * inv_t, scale * inv_t)
            stream_row(e, g, nt)
        return dot + z_loss * lse * lse, lse, m_next

    @njit(parallel=True, cache=True)
    def kernel(
        x, t, w, has_w, c_t, c_s, z_loss, scales, loss, lse, grad, want_grad, nt, cap, inv_cap,
        inv_t,
    ):
        m_rows, v = x.shape
        nb = _nblocks(m_rows, 8)
        for b in prange(nb):
            e = np.empty(v, dtype=loss.dtype)
            last = (b + 1) * m_rows // nb - 1
            mx, known = compute_zero(x), False  # row i's max when known (found with row i - 1)
            for i in range(b * m_rows // nb, last + 1):
                nxt, ahead = _next_row(x, i, last)
                g = grad[i]  # an empty row when no gradient is wanted
                scale = scales[i] if scales.shape[0] > 1 else scales[0]
                loss[i], lse[i], m_next = row(
                    x[i], mx if known else _row_max(x[i]), t[i], w, has_w, c_t, c_s, z_loss,
                    scale, e, nxt, g, want_grad, nt, cap, inv_cap, inv_t,
                )
                mx, known = m_next, ahead
            fence()

    return kernel


def ce_prob_partial_kernel(transform: int):
    """This slice's partial statistics of every row for probability targets sliced like the
    logits, for one ``transform`` (as in :func:`ce_index_kernel`)::

        kernel(x, t, w, has_w, c_t, c_s, proto, cap, inv_cap, inv_t, parts)

    ``parts`` ``(4, M)`` float64 receives per row: the max of u, Σ exp(u - ref) (ref: the max
    where finite, else 0), Σ w t'·(u - ref) and Σ w t' (``t' = c_t·t + c_s``), the last two
    summed in float64 as :func:`_prob_dots` sums (each term torch's product). One read of the
    row for the max (shared with the previous row's pass), one for the rest.
    """
    capped = transform == 2
    transformed = transform != 0
    exp_sum = _exp_sum_row(transform, keep=False)  # the exponentials only summed

    @njit(parallel=True, cache=True)
    def kernel(x, t, w, has_w, c_t, c_s, proto, cap, inv_cap, inv_t, parts):
        m_rows, v = x.shape
        nb = _nblocks(m_rows, 8)
        zero = np.float64(0.0)
        for b in prange(nb):
            e = np.empty(v, dtype=proto.dtype)
            last = (b + 1) * m_rows // nb - 1
            mx, known = compute_zero(x), False  # row i's max when known (found with row i - 1)
            for i in range(b * m_rows // nb, last + 1):
                xr = x[i]
                nxt, ahead = _next_row(x, i, last)
                m = mx if known else _row_max(xr)
                if transformed:
                    m = _u(m, cap, inv_cap, inv_t)
                ref = m if math.isfinite(m) else like(0, m)
                s, mx = exp_sum(xr, ref, e, nxt, cap, inv_cap, inv_t)
                known = ahead
                r64 = np.float64(ref)  # the dots in float64, rounded to nothing
                if capped:
                    total, dot = _prob_dots_cap(
                        xr, t[i], r64, zero, w, has_w, c_t, c_s, cap, inv_cap, inv_t
                    )
                else:
                    total, dot = _prob_dots(xr, t[i], r64, zero, w, has_w, c_t, c_s, inv_t)
                parts[0, i] = m
                parts[1, i] = s
                parts[2, i] = -dot  # Σ w t'·(0 - (u - ref)) negated
                parts[3, i] = total

    return kernel


def ce_prob_partial_grad_kernel(transform: int):
    """The gradient of this slice's columns for probability targets given the merged
    statistics, for one ``transform``::

        kernel(x, t, w, has_w, c_t, c_s, lse, a, b, grad, nt, cap, inv_cap, inv_t)

    Per row ``i``: ``grad = (p_j·a_i - b_i·w_j t'_j)·(d u_j/d x_j)`` with
    ``p_j = exp(u_j - lse_i)``; ``a`` (the merged coefficient) and ``b`` already hold the row's
    gradient scale. One pass over each row, the gradient streamed.
    """
    capped = transform == 2
    transformed = transform != 0
    exp_sum = _exp_sum_row(transform)

    @njit(parallel=True, cache=True)
    def kernel(x, t, w, has_w, c_t, c_s, lse, a, b, grad, nt, cap, inv_cap, inv_t):
        m_rows, v = x.shape
        nb = _nblocks(m_rows, 8)
        for blk in prange(nb):
            e = np.empty(v, dtype=lse.dtype)
            last = (blk + 1) * m_rows // nb - 1
            for i in range(blk * m_rows // nb, last + 1):
                xr = x[i]
                if transformed:
                    exp_sum(xr, lse[i], e, xr, cap, inv_cap, inv_t)
                else:
                    _exps(xr, lse[i], e)
                if capped:
                    _prob_grad_cap(e, t[i], xr, w, has_w, c_t, c_s, a[i], b[i], inv_cap, inv_t)
                else:
                    _prob_grad(e, t[i], w, has_w, c_t, c_s, a[i] * inv_t, b[i] * inv_t)
                stream_row(e, grad[i], nt)
            fence()

    return kernel


# ---- softmax / log_softmax --------------------------------------------------------------


@njit(fastmath=FM_WRITE, cache=True)
def _log_probs(xr, m, log_s, e):
    wide_vectors()
    for j in range(xr.shape[0]):
        e[j] = (load(xr, j) - m) - log_s


def softmax_fwd_kernel(log: bool):
    """softmax (``log`` false) or log_softmax of each row, ``p = exp(z) / Σ exp(z)``,
    ``log p = z - log Σ``, compiled for one of the two::

        kernel(x, out, proto, nt)
    """
    keep_exp = _exp_sum_row(0)
    sum_only = _exp_sum_row(0, keep=False)  # log_softmax's streamed output: from x itself

    @njit(parallel=True, cache=True)
    def kernel(x, out, proto, nt):
        m_rows, v = x.shape
        nb = _nblocks(m_rows, 8)
        for b in prange(nb):
            e = np.empty(v, dtype=proto.dtype)
            last = (b + 1) * m_rows // nb - 1
            m_next, known = compute_zero(x), False  # the max of row i when known
            for i in range(b * m_rows // nb, last + 1):
                xr = x[i]
                nxt, ahead = _next_row(x, i, last)
                m = m_next if known else _row_max(xr)
                one = like(1, m)
                if log and nt:
                    s, m_next = sum_only(xr, m, e, nxt, one - one, one, one)
                else:
                    s, m_next = keep_exp(xr, m, e, nxt, one - one, one, one)
                known = ahead
                if _bad(m, s):
                    _fill(out[i], math.nan)
                    continue
                if log and nt:  # log p = (x - m) - log s, computed while streaming
                    stream_formula(LOG_PROBS, xr, xr, out[i], m, like(math.log(s), m), nt)
                elif log:
                    _log_probs(xr, m, like(math.log(s), m), e)
                    stream_row(e, out[i], nt)
                else:  # p = e·(1/s), multiplied while streaming
                    stream_row_affine(e, out[i], like(1, m) / s, like(0, m), 0, 0, nt)
            fence()

    return kernel


@njit(fastmath=FM_REDUCE, cache=True, inline="always")
def _dot_step(j, lane, acc, args):
    g, y = args
    acc[0][lane] += np.float64(load(g, j)) * np.float64(load(y, j))


@njit(fastmath=FM_REDUCE, cache=True)
def _dot(g, y):
    wide_vectors()
    s, t = lanes(0.0), lanes(0.0)
    lane_loop(g.shape[0], _dot_step, (s,), (t,), (g, y))
    return lane_sum(s, t)


@njit(fastmath=FM_REDUCE, cache=True, inline="always")
def _dot_short_step(j, lane, acc, args):
    g, y = args
    acc[0][lane] += load(g, j) * load(y, j)


@njit(fastmath=FM_REDUCE, cache=True)
def _dot_short(g, y):
    """``Σ g·y`` over a block of 16-bit rows, accumulated in float32 (block sums meet in
    float64, as every sum here). With :func:`_dot`'s float64 products, a pass over two 16-bit
    rows is bound by its vector instructions rather than by memory."""
    wide_vectors()
    s, t = lanes(np.float32(0)), lanes(np.float32(0))
    lane_loop(g.shape[0], _dot_short_step, (s,), (t,), (g, y))
    return lane_sum(s, t)


# e = exp(y) (the probabilities, from log_softmax's output) and Σ g over a block, in one loop:
# the loads of both rows overlap the exponentials' arithmetic. The sum in float32 for 16-bit
# rows (block sums meet in float64, see _dot_short), else in float64.


@njit(fastmath=FM_REDUCE, cache=True, inline="always")
def _exp_lsum_step(j, lane, acc, args):
    y, e, g = args
    write_scratch(e, j, exp_for(y, load_row(y, j)))
    acc[0][lane] += np.float64(load_row(g, j))


@njit(fastmath=FM_REDUCE, cache=True)
def _exp_lsum_block(y, e, g):
    wide_vectors()
    s, t = lanes(0.0), lanes(0.0)
    lane_loop(y.shape[0], _exp_lsum_step, (s,), (t,), (y, e, g))
    return lane_sum(s, t)


@njit(fastmath=FM_REDUCE, cache=True, inline="always")
def _exp_lsum_short_step(j, lane, acc, args):
    y, e, g = args
    write_scratch(e, j, exp_for(y, load_row(y, j)))
    acc[0][lane] += load_row(g, j)


@njit(fastmath=FM_REDUCE, cache=True)
def _exp_lsum_block_short(y, e, g):
    wide_vectors()
    s, t = lanes(np.float32(0)), lanes(np.float32(0))
    lane_loop(y.shape[0], _exp_lsum_short_step, (s,), (t,), (y, e, g))
    return lane_sum(s, t)


def _lsum_exp_row(g, y, e):
    """``Σ g``, and ``e = exp(y)``, block by block."""
    raise NotImplementedError  # only callable from jitted code


@overload(_lsum_exp_row)
def _lsum_exp_row_impl(g, y, e):
    block = _exp_lsum_block_short if g.dtype.bitwidth == 16 else _exp_lsum_block  # as typed

    def impl(g, y, e):
        v = g.shape[0]
        s = 0.0
        for lo in range(0, v, BLOCK):
            hi = min(lo + BLOCK, v)
            s += block(y[lo:hi], e[lo:hi], g[lo:hi])
        return like(s, e[0])

    return impl


def _bwd_dot(g, y):
    """``Σ g·y`` of a row (softmax's backward), block by block."""
    raise NotImplementedError  # only callable from jitted code


@overload(_bwd_dot)
def _bwd_dot_impl(g, y):
    dot = _dot_short if g.dtype.bitwidth == 16 else _dot  # chosen as the row is typed

    def impl(g, y):
        v = g.shape[0]
        s = 0.0
        for lo in range(0, v, BLOCK):
            hi = min(lo + BLOCK, v)
            s += dot(g[lo:hi], y[lo:hi])
        return like(s, load(g, 0))

    return impl


def _softmax_grad_row(y, g, dst, d, y_next, g_next, nt):
    """``dst = y·(g - d)``, and returns the next row's ``Σ g·y`` (float64)."""
    raise NotImplementedError  # only callable from jitted code


@overload(_softmax_grad_row, inline="always")
def _softmax_grad_row_impl(y, g, dst, d, y_next, g_next, nt):
    if y.dtype.bitwidth == 16:  # the next row read in the same loop
        return lambda y, g, dst, d, y_next, g_next, nt: stream_softmax_grad(
            y, g, dst, d, y_next, g_next, nt
        )

    def separate(y, g, dst, d, y_next, g_next, nt):  # float64 products: a pass apart
        stream_formula(SOFTMAX_GRAD, y, g, dst, d, d, nt)
        return np.float64(_bwd_dot(g_next, y_next))

    return separate


def softmax_bwd_kernel(log: bool):
    """The backward of softmax (``log`` false), ``gx = y·(g - Σ g·y)``, or of log_softmax,
    ``gx = g - exp(y)·Σ g``, compiled for one of the two::

        kernel(g, y, gx, proto, nt)

    The output is computed from the inputs as it is stored (streamed when ``nt``): for softmax
    after a pass for ``Σ g·y`` (16-bit rows: the next row's read in the same loop as this row's
    output); for log_softmax after one pass that sums g and keeps exp(y) in a scratch row."""

    @njit(parallel=True, cache=True)
    def kernel(g, y, gx, proto, nt):
        m_rows, v = g.shape
        nb = _nblocks(m_rows, 8)
        for b in prange(nb):
            e = np.empty(v if log else 0, dtype=proto.dtype)  # exp(y): log_softmax's only
            last = (b + 1) * m_rows // nb - 1
            d_next, known = compute_zero(y), False  # softmax's Σ g·y of row i, found with i - 1
            for i in range(b * m_rows // nb, last + 1):
                if log:  # g - exp(y)·Σg: the exponentials while Σg is read
                    d = _lsum_exp_row(g[i], y[i], e)
                    stream_formula(LOG_SOFTMAX_GRAD, e, g[i], gx[i], d, d, nt)
                else:  # y·(g - Σ g·y), then the next row's Σ g·y
                    d = d_next if known else _bwd_dot(g[i], y[i])
                    k = min(i + 1, last)
                    d_next = like(_softmax_grad_row(y[i], g[i], gx[i], d, y[k], g[k], nt), d)
                    known = i < last
            fence()

    return kernel


# ---- token statistics -------------------------------------------------------------------
# Per row, with u the logits as read, m = max u, z = u - m, s = Σ exp(z), p = exp(z)/s:
# logprob = z_y - log s, entropy = log s - Σ p z, lse = m + log s, argmax = first j with
# u_j = m (first NaN in a row holding NaN, as torch's argmax).


@njit(fastmath=FM_REDUCE, cache=True, inline="always")
def _exp_dot_step(j, lane, acc, args):
    xr, m, e = args
    z = load_row(xr, j) - m
    v = exp_for(xr, z)
    write_scratch(e, j, v)
    acc[0][lane] += v
    acc[1][lane] += v * z


@njit(fastmath=FM_REDUCE, cache=True)
def _exp_dot_block(xr, m, e):
    """``e_j = exp(z_j)``; returns ``(Σ e_j, Σ e_j·z_j)``."""
    wide_vectors()
    main, tail = (lanes(like(0, m)), lanes(like(0, m))), (lanes(like(0, m)), lanes(like(0, m)))
    lane_loop(xr.shape[0], _exp_dot_step, main, tail, (xr, m, e))
    return lane_sum(main[0], tail[0]), lane_sum(main[1], tail[1])


@njit(fastmath=FM_REDUCE, cache=True, inline="always")
def _exp_dot_scaled_step(j, lane, acc, args):
    xr, m, e, inv_t = args
    z = load_row(xr, j) * inv_t - m
    v = exp_for(xr, z)
    write_scratch(e, j, v)
    acc[0][lane] += v
    acc[1][lane] += v * z


@njit(fastmath=FM_REDUCE, cache=True)
def _exp_dot_block_scaled(xr, m, e, inv_t):
    """As :func:`_exp_dot_block` for logits divided by a temperature."""
    wide_vectors()
    main, tail = (lanes(like(0, m)), lanes(like(0, m))), (lanes(like(0, m)), lanes(like(0, m)))
    lane_loop(xr.shape[0], _exp_dot_scaled_step, main, tail, (xr, m, e, inv_t))
    return lane_sum(main[0], tail[0]), lane_sum(main[1], tail[1])


@njit(fastmath=FM_REDUCE, cache=True, error_model="numpy", inline="always")
def _exp_dot_cap_step(j, lane, acc, args):
    xr, m, e, cap, inv_cap, inv_t = args
    z = cap * fast_tanh(load_row(xr, j) * inv_cap) * inv_t - m
    v = exp_for(xr, z)
    write_scratch(e, j, v)
    acc[0][lane] += v
    acc[1][lane] += v * z


@njit(fastmath=FM_REDUCE, cache=True, error_model="numpy")
def _exp_dot_block_cap(xr, m, e, cap, inv_cap, inv_t):
    """As :func:`_exp_dot_block` for soft-capped (and scaled) logits."""
    wide_vectors()
    main, tail = (lanes(like(0, m)), lanes(like(0, m))), (lanes(like(0, m)), lanes(like(0, m)))
    lane_loop(xr.shape[0], _exp_dot_cap_step, main, tail, (xr, m, e, cap, inv_cap, inv_t))
    return lane_sum(main[0], tail[0]), lane_sum(main[1], tail[1])


@functools.cache
def _token_rows(transform: int):  # noqa: C901
    """The row functions of the token statistics for one ``transform`` (as in
    :func:`ce_index_kernel`), each compiled with only that transform's code:

    - ``stats(xr, e, cap, inv_cap, inv_t)``: ``(m, s, Σ e z)`` of a row, its exponentials
      left in ``e``;
    - ``argmax(xr, e, m, cap, inv_cap, inv_t, has_nan)``: the first NaN when the row may hold
      one, else the first j with u_j = m. For transformed logits u_j is evaluated only where
      ``e_j = exp(u_j - m)`` is not below 1/2 (the max's own exponential is 1 up to rounding,
      or NaN for an infinite max), not along the whole row;
    - ``grad_block(xr, e, m, inv_s, mean_z, glp, gh, cap, inv_cap, inv_t)``:
      ``e_j = p_j·(-g_lp - g_h·(z_j - mean z))·d u_j/d x_j`` in place.

    Made once per process for each transform: both kernels call the same functions.
    """
    capped = transform == 2
    scaled = transform == 1

    @njit(cache=True)
    def stats(xr, e, cap, inv_cap, inv_t):
        m = _row_max(xr)
        if capped or scaled:
            m = _u(m, cap, inv_cap, inv_t)
        s, d = 0.0, 0.0
        v = xr.shape[0]
        for lo in range(0, v, BLOCK):
            hi = min(lo + BLOCK, v)
            if capped:
                bs, bd = _exp_dot_block_cap(xr[lo:hi], m, e[lo:hi], cap, inv_cap, inv_t)
            elif scaled:
                bs, bd = _exp_dot_block_scaled(xr[lo:hi], m, e[lo:hi], inv_t)
            else:
                bs, bd = _exp_dot_block(xr[lo:hi], m, e[lo:hi])
            s += bs
            d += bd
        return m, like(s, m), like(d, m)

    @njit(cache=True)
    def argmax(xr, e, m, cap, inv_cap, inv_t, has_nan):
        if has_nan:
            for j in range(xr.shape[0]):
                xv = load(xr, j)
                if xv != xv:
                    return j
        if capped or scaled:
            for j in range(xr.shape[0]):
                if not e[j] < 0.5 and _u(load(xr, j), cap, inv_cap, inv_t) == m:  # NaN e: +inf
                    return j
        else:
            for j in range(xr.shape[0]):
                if load(xr, j) == m:
                    return j
        return 0

    @njit(fastmath=FM_WRITE, cache=True, error_model="numpy")
    def grad_block(xr, e, m, inv_s, mean_z, glp, gh, cap, inv_cap, inv_t):
        wide_vectors()
        if capped:
            for j in range(e.shape[0]):
                th = fast_tanh(load(xr, j) * inv_cap)
                z = cap * th * inv_t - m
                e[j] = e[j] * inv_s * (-glp - gh * (z - mean_z)) * (inv_t * (like(1, th) - th * th))
        elif scaled:
            for j in range(e.shape[0]):
                z = load(xr, j) * inv_t - m
                e[j] = e[j] * inv_s * (-glp - gh * (z - mean_z)) * inv_t
        else:
            for j in range(e.shape[0]):
                z = load(xr, j) - m
                e[j] = e[j] * inv_s * (-glp - gh * (z - mean_z))

    return stats, argmax, grad_block


def stats_fwd_kernel(transform: int):
    """Token statistics of every row of ``x`` (see the section comment), compiled for one
    ``transform`` (see :func:`_token_rows`)::

        kernel(x, target, ignore_index, cap, inv_cap, inv_t, logprob, entropy, lse, argmax)
    """
    stats, argmax, _ = _token_rows(transform)
    transformed = transform != 0

    @njit(parallel=True, cache=True)
    def kernel(x, target, ignore_index, cap, inv_cap, inv_t, logprob, entropy, lse, argmax_out):
        m_rows, v = x.shape
        nb = _nblocks(m_rows, 8)
        for b in prange(nb):
            e = np.empty(v, dtype=logprob.dtype)
            for i in range(b * m_rows // nb, (b + 1) * m_rows // nb):
                xr = x[i]
                m, s, d = stats(xr, e, cap, inv_cap, inv_t)
                log_s = like(math.log(s), m)
                lse[i] = m + log_s
                entropy[i] = log_s - d / s
                y = target[i]
                if y == ignore_index:
                    logprob[i] = 0
                else:
                    xy = load(xr, y)
                    uy = _u(xy, cap, inv_cap, inv_t) if transformed else xy
                    logprob[i] = (uy - m) - log_s
                argmax_out[i] = argmax(xr, e, m, cap, inv_cap, inv_t, s != s)

    return kernel


def stats_bwd_kernel(transform: int):
    """d(Σ g_lp·logprob + g_h·entropy)/d x for every row of ``x``, exponentials recomputed,
    compiled for one ``transform`` (see :func:`_token_rows`)::

        kernel(x, target, ignore_index, g_lp, g_h, cap, inv_cap, inv_t, gx, proto, nt)
    """
    stats, _, grad_block = _token_rows(transform)
    capped = transform == 2
    transformed = transform != 0

    @njit(parallel=True, cache=True)
    def kernel(x, target, ignore_index, g_lp, g_h, cap, inv_cap, inv_t, gx, proto, nt):
        m_rows, v = x.shape
        nb = _nblocks(m_rows, 8)
        for b in prange(nb):
            e = np.empty(v, dtype=proto.dtype)
            for i in range(b * m_rows // nb, (b + 1) * m_rows // nb):
                xr = x[i]
                m, s, d = stats(xr, e, cap, inv_cap, inv_t)
                y = target[i]
                glp = g_lp[i] if y != ignore_index else like(0, m)
                xy = load(xr, y) if y != ignore_index else like(0, m)
                for lo in range(0, v, BLOCK):
                    hi = min(lo + BLOCK, v)
                    grad_block(
                        xr[lo:hi], e[lo:hi], m, like(1, m) / s, d / s, glp, g_h[i], cap,
                        inv_cap, inv_t,
                    )
                if y != ignore_index:
                    du = like(1, m)
                    if capped:
                        du = _du_dx(xy, inv_cap, inv_t)
                    elif transformed:
                        du = inv_t
                    e[y] += glp * du
                stream_row(e, gx[i], nt)
            fence()

    return kernel


# ---- cross entropy over columns -----------------------------------------------------------
# The linear cross entropy holds the logits of up to D rows transposed, (V, n): one token per
# column. ce_index_cols_kernel computes what ce_index_kernel computes for each column, in
# place, without transposing: bands of columns are spread over threads, and each band walks its
# V rows twice. The first walk, a group of rows at a time (the group stays in L2), takes the
# group's column maxima, rescales the running sums of exponentials where a maximum grew, and
# adds the group's exponentials; the second writes the gradient. A column is too long to keep
# its exponentials, so the second walk evaluates each one again; both run along contiguous
# rows, vectorised across columns. Per-column sums accumulate in float64.

COL_BAND = 1024  # columns per band at most: its per-column state stays in L1
ROW_GROUP = 32  # rows per group of the first walk


@njit(fastmath=FM_REDUCE, cache=True)
def _cols_max(xr, m):
    for c in range(m.shape[0]):
        m[c] = fmax(m[c], load(xr, c))


@functools.cache
def _cols_steps(smoothing: bool, transform: int):  # noqa: C901
    """The walks' steps over one row of a band of columns, for one set of options (label
    ``smoothing`` on, ``transform`` as in :func:`ce_index_kernel`), compiled with only their
    code; made once per process for each set:

    - ``rescale(gm, m, s, cap, inv_cap, inv_t)``: the running maxima ``m`` (of u) raised to the
      group's maxima ``gm`` (of x, reset to -inf here), the running sums ``s`` scaled by
      ``exp(old m - new m)``;
    - ``exp_sum(xr, m, s, su, wr, cap, inv_cap, inv_t)``: ``s_c += exp(u_c - m_c)`` and, with
      smoothing, ``su_c += w_r·u_c``;
    - ``grad(xr, m, a, b, keep, wr, cap, inv_cap, inv_t)``: ``x_c = exp(u_c - m_c)·a_c - b_c·w_r``
      (times d u/d x with a cap) in place; zero in columns not kept;
    - ``u(xv, cap, inv_cap, inv_t)``: the logit as read.

    u is evaluated by ``u`` (compiled without fast-math, :func:`_u` for transformed logits) in
    both walks: each exponential of the second walk is then the very one summed in the first,
    whatever the loops' own flags.
    """
    capped = transform == 2
    transformed = transform != 0

    @njit(cache=True, error_model="numpy")
    def u(xv, cap, inv_cap, inv_t):
        if transformed:
            return _u(xv, cap, inv_cap, inv_t)
        return xv

    @njit(fastmath=FM_REDUCE, cache=True, error_model="numpy")
    def rescale(gm, m, s, cap, inv_cap, inv_t):
        for c in range(m.shape[0]):
            mn = fmax(m[c], u(gm[c], cap, inv_cap, inv_t))
            f = np.float64(mn) - np.float64(m[c])
            s[c] *= np.float64(1) if m[c] == mn else fast_exp(-f)
            m[c] = mn
            gm[c] = -np.inf

    @njit(fastmath=FM_REDUCE, cache=True, error_model="numpy")
    def exp_sum(xr, m, s, su, wr, cap, inv_cap, inv_t):
        for c in range(m.shape[0]):
            uc = u(load(xr, c), cap, inv_cap, inv_t)
            s[c] += np.float64(exp_for(xr, uc - m[c]))
            if smoothing:
                su[c] += np.float64(wr * uc)

    @njit(fastmath=FM_WRITE, cache=True, error_model="numpy")
    def grad(xr, m, a, b, keep, wr, cap, inv_cap, inv_t):
        if capped:
            for c in range(m.shape[0]):
                xv = load(xr, c)
                e = exp_for(xr, u(xv, cap, inv_cap, inv_t) - m[c])
                g = (e * a[c] - b[c] * wr) * _du_dx(xv, inv_cap, inv_t)
                g = g if keep[c] else like(0, g)  # (a conditional passed straight to store is
                store(xr, c, g)  # dropped by Numba's inlining: named first)
        else:
            for c in range(m.shape[0]):
                g = exp_for(xr, u(load(xr, c), cap, inv_cap, inv_t) - m[c]) * a[c] - b[c] * wr
                g = g if keep[c] else like(0, g)
                store(xr, c, g)

    return rescale, exp_sum, grad, u


def ce_index_cols_kernel(smoothing: bool, transform: int):  # noqa: C901
    """Cross entropy with class indices down the columns of ``x`` ``(V, n)`` for one set of
    options (as in :func:`ce_index_kernel`; the z-loss is always compiled in)::

        kernel(x, target, w, has_w, w_total, ignore_index, c_t, c_s, z_loss, scales, loss,
               lse, want_grad, cap, inv_cap, inv_t, bands)

    arguments as in :func:`ce_index_kernel`'s kernel; the gradient (when wanted) is written
    over ``x``. ``bands``: how many bands of columns to split the work into (at least one per
    thread).
    """
    capped = transform == 2
    rescale, exp_sum, grad, u = _cols_steps(smoothing, transform)

    @njit(cache=True)
    def band(
        x, target, w, has_w, w_total, ignore_index, c_t, c_s, z_loss, scales, loss, lse,
        want_grad, cap, inv_cap, inv_t, lo, hi,
    ):
        """Columns ``lo:hi``."""
        v = x.shape[0]
        k = hi - lo
        proto = loss[:1]
        m = np.full(k, -np.inf, dtype=loss.dtype)  # of u
        gm = np.full(k, -np.inf, dtype=loss.dtype)  # of x, in a group of rows
        s = np.zeros(k, dtype=np.float64)
        su = np.zeros(k if smoothing else 0, dtype=np.float64)
        one = like(1, proto[0])
        for r0 in range(0, v, ROW_GROUP):
            r1 = min(r0 + ROW_GROUP, v)
            for r in range(r0, r1):
                _cols_max(x[r, lo:hi], gm)
            rescale(gm, m, s, cap, inv_cap, inv_t)
            for r in range(r0, r1):
                wr = w[r] if has_w else one
                exp_sum(x[r, lo:hi], m, s, su, wr, cap, inv_cap, inv_t)
        a = np.zeros(k, dtype=loss.dtype)
        b = np.zeros(k, dtype=loss.dtype)
        cy = np.zeros(k, dtype=loss.dtype)  # subtracted at the target
        xys = np.zeros(k, dtype=loss.dtype)  # the target logits
        keep = np.zeros(k, dtype=np.bool_)
        wt = w_total if has_w else like(v, proto[0])
        for c in range(k):
            i = lo + c
            y = target[i]
            if y == ignore_index:
                loss[i] = 0
                lse[i] = math.nan
                continue
            keep[c] = True
            mc = m[c]
            sc = like(s[c], mc)
            if _bad(mc, sc):
                loss[i] = math.nan
                lse[i] = math.nan
                a[c] = b[c] = math.nan
                continue
            scale = scales[i] if scales.shape[0] > 1 else scales[0]
            wy = w[y] if has_w else one
            xy = load(x[y], i)
            xys[c] = xy
            zy = u(xy, cap, inv_cap, inv_t) - mc
            log_s = like(math.log(sc), mc)
            lse[i] = mc + log_s
            li = c_t * wy * (log_s - zy)
            if smoothing:
                if math.isfinite(wt):
                    li += c_s * (wt * log_s - like(su[c] - np.float64(mc) * np.float64(wt), mc))
                else:  # an inf or NaN class weight (see _smoothing_terms)
                    li += c_s * _smoothing_terms_col(x, i, mc, log_s, w, cap, inv_cap, inv_t)
            if z_loss != 0:
                li += z_loss * lse[i] * lse[i]
            loss[i] = li
            ws = c_s * wt if smoothing else like(0, mc)  # as in ce_index_kernel's row
            a[c] = like(scale * (c_t * wy + ws + 2 * z_loss * lse[i]) / sc, mc)
            b[c] = like(scale * c_s, mc)
            cy[c] = like(scale * c_t * wy, mc)
            if capped:
                cy[c] *= _du_dx(xy, inv_cap, inv_t)
            else:  # 1/T folds into the affine map
                a[c], b[c], cy[c] = a[c] * inv_t, b[c] * inv_t, cy[c] * inv_t
        if not want_grad:
            return
        # the weights enter the gradient only through the smoothing term, b·w_r (b = 0 without
        # smoothing, where an inf or NaN weight must not turn 0·w into NaN)
        weighted = has_w and smoothing
        for r in range(v):
            wr = w[r] if weighted else one
            grad(x[r, lo:hi], m, a, b, keep, wr, cap, inv_cap, inv_t)
        # each target's element computed again, whole, and rounded once to the storage dtype
        for c in range(k):
            if keep[c]:
                y = target[lo + c]
                xv = xys[c]
                wy = w[y] if weighted else one
                e = exp_for(x, u(xv, cap, inv_cap, inv_t) - m[c])
                if capped:
                    gy = (e * a[c] - b[c] * wy) * _du_dx(xv, inv_cap, inv_t) - cy[c]
                else:
                    gy = e * a[c] - b[c] * wy - cy[c]
                store(x[y], lo + c, gy)

    @njit(parallel=True, cache=True)
    def kernel(
        x, target, w, has_w, w_total, ignore_index, c_t, c_s, z_loss, scales, loss, lse,
        want_grad, cap, inv_cap, inv_t, bands,
    ):
        n = x.shape[1]
        for bnd in prange(bands):
            # band edges on cache lines: neighbouring bands never write to one line
            per_line = LINE // x.itemsize
            lo = min(n, (bnd * n // bands) // per_line * per_line)
            hi = n if bnd == bands - 1 else min(n, ((bnd + 1) * n // bands) // per_line * per_line)
            for c0 in range(lo, hi, COL_BAND):
                band(
                    x, target, w, has_w, w_total, ignore_index, c_t, c_s, z_loss, scales, loss,
                    lse, want_grad, cap, inv_cap, inv_t, c0, min(c0 + COL_BAND, hi),
                )

    return kernel
