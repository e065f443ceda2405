"""Triton kernel: cross entropy with class-index targets, one program per row.

Pass 1 reads the row once for its max and ``s = Σ exp(u - m)`` together (the running sum
rescaled whenever the max grows), the target's logit, and for label smoothing
``Σ w_j·(u_j - m)`` (rescaled with the max as well, so no large sum of logits is ever
formed); pass 2 reads the row again and writes the gradient of the row's loss in the logits'
dtype. ``u`` is the logit divided by the temperature. Per row:
``loss = (1-ε)·w_y·(log s - (u_y - m)) + (ε/V)·(W·log s - Σ w_j (u_j - m)) + λ·lse²`` with
``lse = m + log s``, and ``d loss/d x_j = c·(p_j·a - (ε/V)·w_j - (1-ε)·w_y·[j = y]) / T`` with
``a = (1-ε)·w_y + (ε/V)·W + 2λ·lse``, ``c`` the row's gradient scale. Ignored rows: loss 0,
gradient 0, lse NaN (not computed).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def ce_index_kernel(
    X, stride_x, T, W, GRAD, stride_g, SCALE, LOSS, LSE,
    V, ignore_index, P,
    HAS_W: tl.constexpr, SMOOTH: tl.constexpr, ZLOSS: tl.constexpr, TEMP: tl.constexpr,
    WANT_GRAD: tl.constexpr, HAS_SCALE: tl.constexpr, ROW_SCALE: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    # ε, λ, 1/T and W = Σ w in the accumulation dtype (float arguments would be float32)
    eps = tl.load(P).to(ACC)
    z_loss = tl.load(P + 1).to(ACC)
    inv_t = tl.load(P + 2).to(ACC)
    x_row = X + row * stride_x
    g_row = GRAD + row * stride_g
    y = tl.load(T + row)
    if y == ignore_index:
        tl.store(LOSS + row, tl.zeros((), ACC))
        tl.store(LSE + row, tl.full((), float("nan"), ACC))
        if WANT_GRAD:
            for off in range(0, V, BLOCK):
                cols = off + tl.arange(0, BLOCK)
                tl.store(g_row + cols, tl.zeros((BLOCK,), ACC), mask=cols < V)
        return

    # pass 1: max, Σ exp(u - m), Σ w·(u - m), the running max rescaling what came before
    m = tl.full((), float("-inf"), ACC)
    s = tl.zeros((), ACC)
    sz = tl.zeros((), ACC)  # Σ w_j (u_j - m) over the columns read so far
    w_seen = tl.zeros((), ACC)  # Σ w_j over the columns read so far
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < V
        u = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(ACC)
        if TEMP:
            u = u * inv_t
        m_new = tl.maximum(m, tl.max(u, 0))
        # shifts by a finite max: while every logit so far is -inf, by 0 (exp(-inf) = 0 then,
        # where -inf - -inf would be NaN; a NaN logit still gives NaN)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new).to(ACC)
        m_prev = tl.where(m == float("-inf"), m_safe, m).to(ACC)
        s = s * tl.exp(m_prev - m_safe) + tl.sum(tl.exp(u - m_safe), 0)
        if SMOOTH:
            if HAS_W:
                w = tl.load(W + cols, mask=mask, other=0.0).to(ACC)
            else:
                w = tl.where(mask, 1.0, 0.0).to(ACC)
            # what came before, re-shifted to the new max (while the max is -inf, the sum
            # holds only -inf terms or none, which no shift changes)
            d = tl.where(mask & (w != 0.0), u - m_safe, 0.0).to(ACC)
            sz = sz + (m_prev - m_safe) * w_seen + tl.sum(w * d, 0)
            w_seen = w_seen + tl.sum(w, 0)
        m = m_new

    log_s = tl.log(s)
    w_total = tl.load(P + 3).to(ACC)
    u_y = tl.load(x_row + y).to(ACC)
    if TEMP:
        u_y = u_y * inv_t
    lse = m + log_s
    if HAS_W:
        w_y = tl.load(W + y).to(ACC)
    else:
        w_y = tl.full((), 1.0, ACC)
    loss = (log_s - (u_y - m)) * w_y
    a = w_y
    if SMOOTH:
        smooth = w_total * log_s - sz
        if HAS_W:
            if w_total - w_total != 0.0:  # an inf or NaN weight: torch's terms, one by one
                smooth = tl.zeros((), ACC)  # (w·(log s - z) is inf or NaN by itself, where
                for off in range(0, V, BLOCK):  # W·log s - Σ w·z would give inf - inf)
                    cols = off + tl.arange(0, BLOCK)
                    mask = cols < V
                    u = tl.load(x_row + cols, mask=mask, other=0.0).to(ACC)
                    if TEMP:
                        u = u * inv_t
                    w = tl.load(W + cols, mask=mask, other=0.0).to(ACC)
                    smooth = smooth + tl.sum(tl.where(mask, w * (log_s - (u - m)), 0.0), 0)
        loss = (1.0 - eps) * loss + (eps / V) * smooth
        a = (1.0 - eps) * w_y + (eps / V) * w_total
    if ZLOSS:
        loss = loss + z_loss * lse * lse
        a = a + 2.0 * z_loss * lse
    tl.store(LOSS + row, loss.to(ACC))
    tl.store(LSE + row, lse.to(ACC))
    if not WANT_GRAD:
        return

    # pass 2: the gradient
    c = tl.full((), 1.0, ACC)
    if HAS_SCALE:
        if ROW_SCALE:
            c = tl.load(SCALE + row).to(ACC)
        else:
            c = tl.load(SCALE).to(ACC)
    if TEMP:
        c = c * inv_t
    k = a * c / s
    t_term = (1.0 - eps) * w_y * c
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < V
        u = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(ACC)
        if TEMP:
            u = u * inv_t
        g = tl.exp(u - m) * k
        if SMOOTH:
            if HAS_W:
                w = tl.load(W + cols, mask=mask, other=0.0).to(ACC)
                g = g - (eps / V) * c * w
            else:
                g = g - (eps / V) * c
        g = tl.where(cols == y, g - t_term, g)
        tl.store(g_row + cols, g.to(GRAD.dtype.element_ty), mask=mask)
