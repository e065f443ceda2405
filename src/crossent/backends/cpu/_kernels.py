"""Fused CPU kernels: softmax, log_softmax and cross entropy on ``(M, V)`` row blocks.

Each row is read once for its max, once to evaluate every exponential exactly once, and the
result (probabilities, or the gradient of the loss) is written in a third, cache-hot pass.
Rows are spread over threads with ``prange``; each thread owns one float scratch row.

Fast-math is chosen per loop: reductions (max, sums, dot products) may be reassociated so
LLVM vectorises them; the loops that evaluate ``exp`` only allow fused multiply-adds, so the
Cody–Waite range reduction of :mod:`._math` is never reassociated. LLVM keeps these flags per
instruction when it inlines the helpers into the kernels.

Rows containing NaN or +inf, or only -inf, give NaN everywhere (loss, lse, gradient), which is
what torch's ``log_softmax`` produces for them; -inf entries in an otherwise finite row are
exact zeros of the probabilities. Targets are range-checked before any kernel runs: indexing
here is unchecked.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange
from numba.core.extending import overload

from ._math import fast_exp, fmax, like, load, store

FM_REDUCE = {"reassoc", "nsz", "contract", "arcp"}
FM_EXP = {"contract"}


# ---- row helpers ------------------------------------------------------------------------
# Sums accumulate in float64 lanes (the rows are cache-hot, so this costs little) and are
# rounded to the compute dtype once: float32 sums over V = 262144 terms stay within the
# tolerance rule. Reductions start from element 0 (rows have V >= 1).


@njit(fastmath=FM_REDUCE, cache=True)
def _row_max(xr):
    """Max of a row (maxNum: NaNs are skipped here and caught by the sum of exponentials)."""
    m = load(xr, 0)
    for j in range(1, xr.shape[0]):
        m = fmax(m, load(xr, j))
    return m


@njit(fastmath=FM_EXP, cache=True)
def _row_exp(xr, m, e):
    """``e[j] = exp(x[j] - m)``: the one exponential of each element (NaN stays NaN)."""
    for j in range(xr.shape[0]):
        e[j] = fast_exp(load(xr, j) - m)


@njit(fastmath=FM_REDUCE, cache=True)
def _sum(e):
    s = np.float64(e[0])
    for j in range(1, e.shape[0]):
        s += np.float64(e[j])
    return like(s, e[0])


@njit(fastmath=FM_REDUCE, cache=True)
def _shifted_sum(xr, m):
    """``Σ_j (x[j] - m)``."""
    s = np.float64(load(xr, 0) - m)
    for j in range(1, xr.shape[0]):
        s += np.float64(load(xr, j) - m)
    return like(s, m)


@njit(fastmath=FM_REDUCE, cache=True)
def _shifted_wsum(xr, m, w):
    """``Σ_j w[j]·(x[j] - m)`` (a zero weight on a -inf logit gives NaN, as in torch)."""
    s = np.float64(w[0] * (load(xr, 0) - m))
    for j in range(1, xr.shape[0]):
        s += np.float64(w[j] * (load(xr, j) - m))
    return like(s, m)


def _exp_buffer(g, buf):
    """The row the exponentials go to: the gradient row itself when it has the compute dtype."""
    raise NotImplementedError


@overload(_exp_buffer, inline="always")
def _exp_buffer_impl(g, buf):
    if g.dtype == buf.dtype:
        return lambda g, buf: g
    return lambda g, buf: buf


@njit(fastmath=FM_EXP, cache=True)
def _write_grad(e, a, b, g):
    """``g[j] = e[j]·a - b`` in g's storage dtype."""
    for j in range(e.shape[0]):
        store(g, j, e[j] * a - b)


@njit(fastmath=FM_EXP, cache=True)
def _write_wgrad(e, a, b, w, g):
    """``g[j] = e[j]·a - b·w[j]`` in g's storage dtype."""
    for j in range(e.shape[0]):
        store(g, j, e[j] * a - b * w[j])


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


@njit(cache=True)
def _ce_index_row(xr, y, w, has_w, w_total, smoothing, c_t, c_s, scale, e, g, want_grad):
    """One row: returns ``(loss, lse)`` and, if ``want_grad``, writes ``scale·d loss/d x``.

    With z = x - max, s = Σ exp(z), c_t = 1-ε, c_s = ε/V and W = Σ_c w_c:
    loss = c_t·w_y·(log s - z_y) + c_s·Σ_c w_c·(log s - z_c);
    d loss/d x_j = p_j·(c_t·w_y + c_s·W) - c_s·w_j - c_t·w_y·[j = y].
    """
    v = xr.shape[0]
    m = _row_max(xr)
    one = like(1, m)
    wy = w[y] if has_w else one
    wt = w_total if has_w else like(v, m)
    neg_wz = like(0, m)
    if smoothing:  # -Σ_c w_c z_c; the W·log s part is added below
        neg_wz = -(_shifted_wsum(xr, m, w) if has_w else _shifted_sum(xr, m))
    zy = load(xr, y) - m  # read before the gradient may overwrite the row (in-place mode)
    _row_exp(xr, m, e)
    s = _sum(e)
    if _bad(m, s):
        if want_grad:
            _fill(g, math.nan)
        return math.nan, math.nan
    log_s = like(math.log(s), m)
    loss = c_t * wy * (log_s - zy)
    if smoothing:
        loss += c_s * (wt * log_s + neg_wz)
    if want_grad:
        ey = e[y]
        a = scale * (c_t * wy + c_s * wt) / s
        b = scale * c_s
        if has_w:
            _write_wgrad(e, a, b, w, g)
        else:
            _write_grad(e, a, b, g)
        store(g, y, ey * a - b * wy - scale * c_t * wy)
    return loss, m + log_s


@njit(parallel=True, cache=True)
def ce_index(
    x, target, w, has_w, w_total, ignore_index, smoothing, c_t, c_s, scale, loss, lse, grad,
    want_grad,
):
    """Cross entropy with class indices over rows of ``x`` (see :func:`_ce_index_row`).

    Reads M·V·b bytes of logits (plus cache-hot re-reads), writes M·V·b of gradient.
    """
    m_rows, v = x.shape
    nb = _nblocks(m_rows, 8)
    for b in prange(nb):
        buf = np.empty(v, dtype=loss.dtype)
        for i in range(b * m_rows // nb, (b + 1) * m_rows // nb):
            y = target[i]
            if y == ignore_index:
                loss[i] = 0
                lse[i] = math.nan  # not computed for ignored rows
                if want_grad:
                    _fill(grad[i], 0.0)
                continue
            if want_grad:
                g = grad[i]
                e = _exp_buffer(g, buf)
                loss[i], lse[i] = _ce_index_row(
                    x[i], y, w, has_w, w_total, smoothing, c_t, c_s, scale, e, g, True
                )
            else:
                loss[i], lse[i] = _ce_index_row(
                    x[i], y, w, has_w, w_total, smoothing, c_t, c_s, scale, buf, buf, False
                )


# ---- cross entropy, probability targets -------------------------------------------------


@njit(fastmath=FM_REDUCE, cache=True)
def _prob_dots(xr, tr, m, w, has_w, c_t, c_s):
    """``(Σ_j w_j t'_j, Σ_j w_j t'_j (x_j - m))`` with ``t' = c_t·t + c_s``."""
    tj = c_t * load(tr, 0) + c_s
    if has_w:
        tj = tj * w[0]
    total = np.float64(tj)
    dot = np.float64(tj * (load(xr, 0) - m))
    for j in range(1, xr.shape[0]):
        tj = c_t * load(tr, j) + c_s
        if has_w:
            tj = tj * w[j]
        total += np.float64(tj)
        dot += np.float64(tj * (load(xr, j) - m))
    return like(total, m), like(dot, m)


@njit(fastmath=FM_EXP, cache=True)
def _write_prob_grad(e, tr, w, has_w, c_t, c_s, a, b, g):
    """``g[j] = e[j]·a - b·w_j·t'_j``."""
    for j in range(e.shape[0]):
        tj = c_t * load(tr, j) + c_s
        if has_w:
            tj = tj * w[j]
        store(g, j, e[j] * a - b * tj)


@njit(cache=True)
def _ce_prob_row(xr, tr, w, has_w, c_t, c_s, scale, e, g, want_grad):
    """loss = -Σ_j w_j t'_j (z_j - log s); d loss/d x_j = p_j·Σ w t' - w_j t'_j."""
    m = _row_max(xr)
    total, dot = _prob_dots(xr, tr, m, w, has_w, c_t, c_s)
    _row_exp(xr, m, e)
    s = _sum(e)
    if _bad(m, s):
        if want_grad:
            _fill(g, math.nan)
        return math.nan, math.nan
    log_s = like(math.log(s), m)
    if want_grad:
        _write_prob_grad(e, tr, w, has_w, c_t, c_s, scale * total / s, scale, g)
    return log_s * total - dot, m + log_s


@njit(parallel=True, cache=True)
def ce_prob(x, t, w, has_w, c_t, c_s, scale, loss, lse, grad, want_grad):
    """Cross entropy with probability targets; reads x and t once each, writes the gradient."""
    m_rows, v = x.shape
    nb = _nblocks(m_rows, 8)
    for b in prange(nb):
        buf = np.empty(v, dtype=loss.dtype)
        for i in range(b * m_rows // nb, (b + 1) * m_rows // nb):
            if want_grad:
                g = grad[i]
                e = _exp_buffer(g, buf)
                loss[i], lse[i] = _ce_prob_row(x[i], t[i], w, has_w, c_t, c_s, scale, e, g, True)
            else:
                loss[i], lse[i] = _ce_prob_row(
                    x[i], t[i], w, has_w, c_t, c_s, scale, buf, buf, False
                )


# ---- softmax / log_softmax --------------------------------------------------------------


@njit(fastmath=FM_EXP, cache=True)
def _write_div(e, s, out):
    for j in range(e.shape[0]):
        store(out, j, e[j] / s)


@njit(fastmath=FM_EXP, cache=True)
def _write_log(xr, m, log_s, out):
    for j in range(xr.shape[0]):
        store(out, j, (load(xr, j) - m) - log_s)


@njit(parallel=True, cache=True)
def softmax_fwd(x, out, log, proto):
    """softmax (or log_softmax) of each row: ``p = exp(z) / Σ exp(z)``, ``log p = z - log Σ``."""
    m_rows, v = x.shape
    nb = _nblocks(m_rows, 8)
    for b in prange(nb):
        buf = np.empty(v, dtype=proto.dtype)
        for i in range(b * m_rows // nb, (b + 1) * m_rows // nb):
            xr = x[i]
            o = out[i]
            m = _row_max(xr)
            e = buf if log else _exp_buffer(o, buf)
            _row_exp(xr, m, e)
            s = _sum(e)
            if _bad(m, s):
                _fill(o, math.nan)
            elif log:
                _write_log(xr, m, like(math.log(s), m), o)
            else:
                _write_div(e, s, o)


@njit(fastmath=FM_REDUCE, cache=True)
def _dot(g, y):
    s = np.float64(load(g, 0)) * np.float64(load(y, 0))
    for j in range(1, g.shape[0]):
        s += np.float64(load(g, j)) * np.float64(load(y, j))
    return like(s, load(g, 0))


@njit(fastmath=FM_REDUCE, cache=True)
def _lsum(g):
    s = np.float64(load(g, 0))
    for j in range(1, g.shape[0]):
        s += np.float64(load(g, j))
    return like(s, load(g, 0))


@njit(fastmath=FM_EXP, cache=True)
def _softmax_bwd_row(g, y, d, gx):
    for j in range(g.shape[0]):
        store(gx, j, load(y, j) * (load(g, j) - d))


@njit(fastmath=FM_EXP, cache=True)
def _log_softmax_bwd_row(g, y, d, gx):
    for j in range(g.shape[0]):
        store(gx, j, load(g, j) - fast_exp(load(y, j)) * d)


@njit(parallel=True, cache=True)
def softmax_bwd(g, y, gx, log):
    """softmax: ``gx = y·(g - Σ g·y)``; log_softmax: ``gx = g - exp(y)·Σ g``."""
    m_rows, v = g.shape
    nb = _nblocks(m_rows, 8)
    for b in prange(nb):
        for i in range(b * m_rows // nb, (b + 1) * m_rows // nb):
            if log:
                _log_softmax_bwd_row(g[i], y[i], _lsum(g[i]), gx[i])
            else:
                _softmax_bwd_row(g[i], y[i], _dot(g[i], y[i]), gx[i])
