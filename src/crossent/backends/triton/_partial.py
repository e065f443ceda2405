"""Triton kernels: cross entropy over a slice ``[start, start + V)`` of the classes (the
vocabulary-parallel and split-row primitives of :mod:`crossent.backends.base`).

``*_partial_kernel`` writes a slice's part of each row's statistics, float64 rows of the
``(K, M)`` result, sums taken relative to the slice's reference point (its max where finite,
else 0); ``*_partial_grad_kernel`` writes the gradient of the slice's columns from the
statistics merged over every slice (``lse`` and ``coef``, the factor of ``p_j``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import f64, grad_scale, online, read


@triton.jit(do_not_specialize=["start", "ignore_index", "cap_b", "temp_b"])
def ce_partial_kernel(
    X, stride_x, T, W, PARTS, M, V, SW, start, ignore_index, cap_b, temp_b,
    HAS_W: tl.constexpr, SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr, TEMP: tl.constexpr,
    ACC: tl.constexpr, DEPTH: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Program ``(i, j)``: rows ``i·ROWS ..`` over the columns ``[j·SW, (j+1)·SW)`` of ``x``
    (the classes from ``start + j·SW``), into ``PARTS[j]`` (``SW = V``: one slice)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    lo = tl.program_id(1) * SW
    hi = tl.minimum(lo + SW, V)
    in_m = rows < M
    cap = f64(cap_b).to(ACC)
    temp = f64(temp_b).to(ACC)
    y = tl.load(T + rows, mask=in_m, other=ignore_index)
    mine = in_m & (y != ignore_index) & (y >= start + lo) & (y < start + hi)
    col = tl.where(mine, y - start, -1)
    x_rows = X + rows[:, None] * stride_x
    m = tl.full((ROWS,), float("-inf"), ACC)
    s = tl.zeros((ROWS,), ACC)
    sz = tl.zeros((ROWS,), ACC)
    w_seen = tl.zeros((ROWS,), ACC)
    w_all = tl.zeros((ROWS,), tl.float64)
    uy = tl.zeros((ROWS,), ACC)
    for off in range(lo, hi, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        valid = in_m[:, None] & (cols[None, :] < hi)
        x = tl.load(x_rows + cols[None, :], mask=valid, other=0.0).to(ACC)
        u, du = read(x, cap, temp, SOFTCAP, TEMP, DEPTH)
        u = tl.where(valid, u, float("-inf"))
        m, s, ref, shift = online(u, m, s)
        uy = uy + tl.sum(tl.where(cols[None, :] == col[:, None], u, 0.0), 1)
        if HAS_W:
            w = tl.load(W + start + cols, mask=cols < hi, other=0.0).to(ACC)
        else:
            w = tl.where(cols < hi, 1.0, 0.0).to(ACC)
        if SMOOTH:
            d = tl.where(valid, u - ref[:, None], 0.0)
            sz = sz + shift * w_seen + tl.sum(w[None, :] * d, 1)
            w_seen = w_seen + tl.sum(w, 0)
        w_all = w_all + tl.sum(w.to(tl.float64), 0)
    out = PARTS + tl.program_id(1).to(tl.int64) * (5 * M) + rows
    tl.store(out, m.to(tl.float64), mask=in_m)
    tl.store(out + M, s.to(tl.float64), mask=in_m)
    tl.store(out + 2 * M, tl.where(mine, uy, 0.0).to(tl.float64), mask=in_m)
    tl.store(out + 3 * M, sz.to(tl.float64), mask=in_m)
    tl.store(out + 4 * M, w_all, mask=in_m)


@triton.jit(do_not_specialize=["start", "total", "ignore_index", "eps_b", "cap_b", "temp_b"])
def ce_partial_grad_kernel(
    X, stride_x, T, W, LSE, COEF, SCALE, GRAD, stride_g,
    M, V, SW, start, total, ignore_index, eps_b, cap_b, temp_b,
    HAS_W: tl.constexpr, SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr, TEMP: tl.constexpr,
    HAS_SCALE: tl.constexpr, ROW_SCALE: tl.constexpr, ACC: tl.constexpr,
    DEPTH: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Program ``(i, j)`` writes the gradient of the columns ``[j·SW, (j+1)·SW)`` of rows
    ``i·ROWS ..`` (see :func:`ce_partial_kernel`)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    lo = tl.program_id(1) * SW
    hi = tl.minimum(lo + SW, V)
    in_m = rows < M
    eps = f64(eps_b).to(ACC)
    cap = f64(cap_b).to(ACC)
    temp = f64(temp_b).to(ACC)
    y = tl.load(T + rows, mask=in_m, other=ignore_index)
    keep = in_m & (y != ignore_index)
    mine = keep & (y >= start) & (y < start + V)
    col = tl.where(mine, y - start, -1)
    if HAS_W:
        w_y = tl.load(W + tl.where(keep, y, 0), mask=keep, other=0.0).to(ACC)
    else:
        w_y = tl.full((ROWS,), 1.0, ACC)
    c = grad_scale(SCALE, rows, in_m, HAS_SCALE, ROW_SCALE, ACC)
    lse = tl.load(LSE + rows, mask=in_m, other=0.0).to(ACC)
    k = tl.load(COEF + rows, mask=in_m, other=0.0).to(ACC) * c
    t_term = tl.where(mine, (1.0 - eps) * w_y, 0.0) * c
    x_rows = X + rows[:, None] * stride_x
    g_rows = GRAD + rows[:, None] * stride_g
    for off in range(lo, hi, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        valid = in_m[:, None] & (cols[None, :] < hi)
        x = tl.load(x_rows + cols[None, :], mask=valid, other=0.0).to(ACC)
        u, du = read(x, cap, temp, SOFTCAP, TEMP, DEPTH)
        g = tl.exp(u - lse[:, None]) * k[:, None]
        if SMOOTH:
            if HAS_W:
                w = tl.load(W + start + cols, mask=cols < hi, other=0.0).to(ACC)
                g = g - (eps / total) * c[:, None] * w[None, :]
            else:
                g = g - ((eps / total) * c)[:, None]
        g = tl.where(cols[None, :] == col[:, None], g - t_term[:, None], g)
        if SOFTCAP or TEMP:
            g = g * du
        g = tl.where(keep[:, None], g, 0.0)
        tl.store(g_rows + cols[None, :], g.to(GRAD.dtype.element_ty), mask=valid)


@triton.jit
def _q(t_rows, W, start, cols, valid, total, eps, HAS_W: tl.constexpr, SMOOTH: tl.constexpr,
       V, ACC: tl.constexpr):  # fmt: skip
    q = tl.load(t_rows + cols[None, :], mask=valid, other=0.0).to(ACC)
    if SMOOTH:
        q = q * (1.0 - eps) + eps / total
    if HAS_W:
        q = q * tl.load(W + start + cols, mask=cols < V, other=0.0).to(ACC)[None, :]
    return tl.where(valid, q, 0.0)


@triton.jit(do_not_specialize=["start", "total", "eps_b", "cap_b", "temp_b"])
def ce_prob_partial_kernel(
    X, stride_x, TG, stride_t, W, PARTS, M, V, start, total, eps_b, cap_b, temp_b,
    HAS_W: tl.constexpr, SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr, TEMP: tl.constexpr,
    ACC: tl.constexpr, DEPTH: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    in_m = rows < M
    eps = f64(eps_b).to(ACC)
    cap = f64(cap_b).to(ACC)
    temp = f64(temp_b).to(ACC)
    x_rows = X + rows[:, None] * stride_x
    t_rows = TG + rows[:, None] * stride_t
    m = tl.full((ROWS,), float("-inf"), ACC)
    s = tl.zeros((ROWS,), ACC)
    sq = tl.zeros((ROWS,), ACC)  # Σ q·(u - ref), products formed first
    q_seen = tl.zeros((ROWS,), ACC)
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        valid = in_m[:, None] & (cols[None, :] < V)
        x = tl.load(x_rows + cols[None, :], mask=valid, other=0.0).to(ACC)
        u, du = read(x, cap, temp, SOFTCAP, TEMP, DEPTH)
        u = tl.where(valid, u, float("-inf"))
        m, s, ref, shift = online(u, m, s)
        q = _q(t_rows, W, start, cols, valid, total, eps, HAS_W, SMOOTH, V, ACC)
        d = tl.where(valid, u - ref[:, None], 0.0)
        sq = sq + shift * q_seen + tl.sum(tl.where(valid, q * d, 0.0), 1)
        q_seen = q_seen + tl.sum(q, 1)
    out = PARTS + rows
    tl.store(out, m.to(tl.float64), mask=in_m)
    tl.store(out + M, s.to(tl.float64), mask=in_m)
    tl.store(out + 2 * M, sq.to(tl.float64), mask=in_m)
    tl.store(out + 3 * M, q_seen.to(tl.float64), mask=in_m)


@triton.jit(do_not_specialize=["start", "total", "eps_b", "cap_b", "temp_b"])
def ce_prob_partial_grad_kernel(
    X, stride_x, TG, stride_t, W, LSE, COEF, SCALE, GRAD, stride_g,
    M, V, start, total, eps_b, cap_b, temp_b,
    HAS_W: tl.constexpr, SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr, TEMP: tl.constexpr,
    HAS_SCALE: tl.constexpr, ROW_SCALE: tl.constexpr, ACC: tl.constexpr,
    DEPTH: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    in_m = rows < M
    eps = f64(eps_b).to(ACC)
    cap = f64(cap_b).to(ACC)
    temp = f64(temp_b).to(ACC)
    c = grad_scale(SCALE, rows, in_m, HAS_SCALE, ROW_SCALE, ACC)
    lse = tl.load(LSE + rows, mask=in_m, other=0.0).to(ACC)
    coef = tl.load(COEF + rows, mask=in_m, other=0.0).to(ACC)
    x_rows = X + rows[:, None] * stride_x
    t_rows = TG + rows[:, None] * stride_t
    g_rows = GRAD + rows[:, None] * stride_g
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        valid = in_m[:, None] & (cols[None, :] < V)
        x = tl.load(x_rows + cols[None, :], mask=valid, other=0.0).to(ACC)
        u, du = read(x, cap, temp, SOFTCAP, TEMP, DEPTH)
        q = _q(t_rows, W, start, cols, valid, total, eps, HAS_W, SMOOTH, V, ACC)
        g = (tl.exp(u - lse[:, None]) * coef[:, None] - q) * c[:, None]
        if SOFTCAP or TEMP:
            g = g * du
        tl.store(g_rows + cols[None, :], g.to(GRAD.dtype.element_ty), mask=valid)
