"""Triton kernels: cross entropy with class-index and with probability targets, the gradient
written in the forward pass.

Class-index rows: the max, ``s = Σ exp(u - m)`` (rescaled whenever the max grows), the
target's logit and for label smoothing ``Σ w_j·(u_j - m)`` (re-shifted with the max as well,
so no large sum of logits is ever formed); then the gradient of the row's loss in the
gradient buffer's dtype. ``u`` is the logit as read (:func:`._common.read`). Per row:
``loss = (1-ε)·w_y·(log s - (u_y - m)) + (ε/V)·(W·log s - Σ w_j (u_j - m)) + λ·lse²`` with
``lse = m + log s``, and ``d loss/d x_j = c·(p_j·a - (ε/V)·w_j - (1-ε)·w_y·[j = y])·du_j``
with ``a = (1-ε)·w_y + (ε/V)·W + 2λ·lse``, ``c`` the row's gradient scale. Ignored rows are
not read: loss 0, gradient 0, lse NaN (not computed).

Probability rows, with ``q = w ⊙ t'`` and ``t' = (1-ε)·t + ε/V``: ``loss = -Σ q_j·(u_j - m -
log s) + λ·lse²`` (each product formed first, as torch forms them: ``0·(-inf)`` is NaN there
too) and ``d loss/d x_j = c·(p_j·(Σ q + 2λ·lse) - q_j)·du_j``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import f64, grad_scale, online, read


@triton.jit
def _index_stats(u, cols, in_row, valid, yc, W, m, s, sz, w_seen, uy, HAS_W: tl.constexpr,
                 SMOOTH: tl.constexpr):  # fmt: skip
    """The running statistics updated with a block: ``cols`` its columns, ``in_row`` which of
    them lie in the row, ``valid`` ``(ROWS, BLOCK)`` which entries are read."""
    m, s, ref, shift = online(u, m, s)
    hit = (cols[None, :] == yc[:, None]) & in_row[None, :]
    uy = uy + tl.sum(tl.where(hit, u, 0.0), 1)
    if SMOOTH:
        if HAS_W:
            w = tl.load(W + cols, mask=in_row, other=0.0).to(u.dtype)
        else:
            w = tl.where(in_row, 1.0, 0.0).to(u.dtype)
        # what came before, re-shifted to the new reference; w·(u - ref) formed term by term
        # as torch does (a zero weight beside a -inf logit is NaN there too)
        d = tl.where(valid, u - ref[:, None], 0.0)
        sz = sz + shift * w_seen + tl.sum(w[None, :] * d, 1)
        w_seen = w_seen + tl.sum(w, 0)
    return m, s, sz, w_seen, uy


@triton.jit
def _index_grad(u, du, cols, in_row, yc, W, V, m, k, c, t_term, keep, eps,
                HAS_W: tl.constexpr, SMOOTH: tl.constexpr, TRANSFORMED: tl.constexpr):  # fmt: skip
    g = tl.exp(u - m[:, None]) * k[:, None]
    if SMOOTH:
        if HAS_W:
            w = tl.load(W + cols, mask=in_row, other=0.0).to(u.dtype)
            g = g - (eps / V) * c[:, None] * w[None, :]
        else:
            g = g - ((eps / V) * c)[:, None]
    g = tl.where(cols[None, :] == yc[:, None], g - t_term[:, None], g)
    if TRANSFORMED:
        g = g * du
    return tl.where(keep[:, None], g, 0.0)


@triton.jit(do_not_specialize=["ignore_index", "eps_b", "z_b", "cap_b", "temp_b"])
def ce_index_kernel(
    X, stride_x, T, W, WSUM, GRAD, stride_g, SCALE, LOSS, LSE,
    M, V, ignore_index, eps_b, z_b, cap_b, temp_b,
    HAS_W: tl.constexpr, SMOOTH: tl.constexpr, ZLOSS: tl.constexpr, SOFTCAP: tl.constexpr,
    TEMP: tl.constexpr, WANT_GRAD: tl.constexpr, HAS_SCALE: tl.constexpr,
    ROW_SCALE: tl.constexpr, ACC: tl.constexpr, DEPTH: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """``ROWS`` rows of at most ``BLOCK`` columns per program, each read once: statistics and
    gradient from the registers."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    in_m = rows < M
    eps = f64(eps_b).to(ACC)
    z_loss = f64(z_b).to(ACC)
    cap = f64(cap_b).to(ACC)
    temp = f64(temp_b).to(ACC)
    y = tl.load(T + rows, mask=in_m, other=ignore_index)
    keep = in_m & (y != ignore_index)
    # the caller range-checked the targets (on CUDA by a device-side assertion queued
    # before this kernel); clamped all the same, so that no index can leave the row
    yc = tl.minimum(tl.maximum(tl.where(keep, y, 0), 0), V - 1).to(tl.int64)
    x_rows = X + rows[:, None] * stride_x
    TRANSFORMED: tl.constexpr = SOFTCAP or TEMP

    m = tl.full((ROWS,), float("-inf"), ACC)
    s = tl.zeros((ROWS,), ACC)
    sz = tl.zeros((ROWS,), ACC)  # Σ w_j (u_j - ref) over the columns read so far
    w_seen = tl.zeros((ROWS,), ACC)  # Σ w_j over the columns read so far
    uy = tl.zeros((ROWS,), ACC)
    cols = tl.arange(0, BLOCK)
    valid = keep[:, None] & (cols[None, :] < V)
    x = tl.load(x_rows + cols[None, :], mask=valid, other=0.0).to(ACC)
    u, du = read(x, cap, temp, SOFTCAP, TEMP, DEPTH)
    u = tl.where(valid, u, float("-inf"))
    m, s, sz, w_seen, uy = _index_stats(u, cols, cols < V, valid, yc, W, m, s, sz, w_seen, uy,
                                        HAS_W, SMOOTH)  # fmt: skip

    log_s = tl.log(s)
    lse = m + log_s
    if HAS_W:
        w_y = tl.load(W + yc, mask=keep, other=0.0).to(ACC)
    else:
        w_y = tl.full((ROWS,), 1.0, ACC)
    loss = (log_s - (uy - m)) * w_y
    a = w_y
    if SMOOTH:
        if HAS_W:
            w_total = tl.load(WSUM).to(ACC)
        else:
            w_total = tl.zeros((ROWS,), ACC) + V  # (V may arrive as the constant 1)
        smooth = w_total * log_s - sz
        if HAS_W:
            if w_total - w_total != 0.0:  # an inf or NaN weight: torch's terms, one by one
                smooth = tl.zeros((ROWS,), ACC)  # (w·(log s - z) is inf or NaN by itself,
                for off in range(0, V, BLOCK):  # where W·log s - Σ w·z would give inf - inf)
                    cols = off + tl.arange(0, BLOCK)
                    valid = keep[:, None] & (cols[None, :] < V)
                    x = tl.load(x_rows + cols[None, :], mask=valid, other=0.0).to(ACC)
                    u, du = read(x, cap, temp, SOFTCAP, TEMP, DEPTH)
                    w = tl.load(W + cols, mask=cols < V, other=0.0).to(ACC)
                    term = w[None, :] * (log_s[:, None] - (u - m[:, None]))
                    smooth = smooth + tl.sum(tl.where(valid, term, 0.0), 1)
        loss = (1.0 - eps) * loss + (eps / V) * smooth
        a = (1.0 - eps) * w_y + (eps / V) * w_total
    if ZLOSS:
        loss = loss + z_loss * lse * lse
        a = a + 2.0 * z_loss * lse
    tl.store(LOSS + rows, tl.where(keep, loss, 0.0).to(ACC), mask=in_m)
    tl.store(LSE + rows, tl.where(keep, lse, float("nan")).to(ACC), mask=in_m)
    if not WANT_GRAD:
        return

    c = grad_scale(SCALE, rows, in_m, HAS_SCALE, ROW_SCALE, ACC)
    k = a * c / s
    t_term = (1.0 - eps) * w_y * c
    g_rows = GRAD + rows[:, None] * stride_g
    g = _index_grad(u, du, cols, cols < V, yc, W, V, m, k, c, t_term, keep, eps, HAS_W, SMOOTH,
                    TRANSFORMED)  # fmt: skip
    tl.store(g_rows + cols[None, :], g.to(GRAD.dtype.element_ty),
             mask=in_m[:, None] & (cols[None, :] < V))  # fmt: skip


@triton.jit
def _part_stats(xa, offs, mask, lead, ycs, W, cap, temp, m, s, sz, w_seen, uy,
                HAS_W: tl.constexpr, SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr,
                TEMP: tl.constexpr, DEPTH: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """The running statistics of a loop kernel's row updated with the part ``offs`` (offsets
    from the aligned address ``xa``; ``mask`` the ones in the row)."""
    x = tl.load(xa + offs, mask=mask, other=0.0).to(ACC)
    u, du = read(x, cap, temp, SOFTCAP, TEMP, DEPTH)
    u = tl.where(mask, u, float("-inf"))[None, :]
    return _index_stats(u, offs - lead, mask, mask[None, :], ycs, W, m, s, sz, w_seen, uy,
                        HAS_W, SMOOTH)  # fmt: skip


@triton.jit
def _part_smooth(xa, offs, mask, lead, W, cap, temp, m, log_s, SOFTCAP: tl.constexpr,
                 TEMP: tl.constexpr, DEPTH: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """Σ w·(log s - (u - m)) over a part, term by term (for non-finite weights)."""
    x = tl.load(xa + offs, mask=mask, other=0.0).to(ACC)
    u, du = read(x, cap, temp, SOFTCAP, TEMP, DEPTH)
    w = tl.load(W + offs - lead, mask=mask, other=0.0).to(ACC)
    return tl.sum(tl.where(mask, w * (log_s - (u - m)), 0.0), 0)


@triton.jit
def _part_grad(xa, ga, offs, mask, lead, ycs, W, V, cap, temp, m, k_row, c, t_term, eps,
               HAS_W: tl.constexpr, SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr,
               TEMP: tl.constexpr, DEPTH: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """The gradient of a part of a loop kernel's row, written."""
    x = tl.load(xa + offs, mask=mask, other=0.0).to(ACC)
    u, du = read(x, cap, temp, SOFTCAP, TEMP, DEPTH)
    keep = tl.full((1,), 1, tl.int1)
    g = _index_grad(u[None, :], du[None, :], offs - lead, mask, ycs, W, V, m, k_row, c, t_term,
                    keep, eps, HAS_W, SMOOTH, SOFTCAP or TEMP)  # fmt: skip
    tl.store(ga + offs, tl.reshape(g, (offs.shape[0],)).to(ga.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["ignore_index", "eps_b", "z_b", "cap_b", "temp_b"])
def ce_index_loop_kernel(
    X, stride_x, T, W, WSUM, GRAD, stride_g, SCALE, LOSS, LSE,
    M, V, ignore_index, eps_b, z_b, cap_b, temp_b,
    HAS_W: tl.constexpr, SMOOTH: tl.constexpr, ZLOSS: tl.constexpr, SOFTCAP: tl.constexpr,
    TEMP: tl.constexpr, WANT_GRAD: tl.constexpr, HAS_SCALE: tl.constexpr,
    ROW_SCALE: tl.constexpr, ACC: tl.constexpr, DEPTH: tl.constexpr, BLOCK: tl.constexpr,
    ALIGN: tl.constexpr,
):  # fmt: skip
    """:func:`ce_index_kernel` for rows longer than a tile, one program per row: the row is
    read once for its statistics and once for its gradient (an ignored row not at all), in
    three parts relative to ``xa``, the row's start rounded down to ``ALIGN`` elements (16
    bytes; the gradient's rows have the logits' stride, or ``ALIGN`` is 1): the first group of
    ``ALIGN`` elements and the last, masked element by element, and between them blocks of
    whole groups, masked group by group, so that they load and store whole vectors (a row of
    50257 classes starts at another alignment in every row)."""
    row = tl.program_id(0).to(tl.int64)
    eps = f64(eps_b).to(ACC)
    z_loss = f64(z_b).to(ACC)
    cap = f64(cap_b).to(ACC)
    temp = f64(temp_b).to(ACC)
    y = tl.load(T + row)
    base = row * stride_x
    lead = (base % ALIGN).to(tl.int32)  # the row starts this many elements after xa
    xa = X + tl.multiple_of(base - lead, ALIGN)
    ga = GRAD + tl.multiple_of(row * stride_g - lead, ALIGN)
    q = (V + lead) // ALIGN  # groups 1 .. q-1 lie wholly in the row
    q_end = tl.maximum(q, 1)
    head = tl.arange(0, ALIGN)
    head_mask = (head >= lead) & (head < V + lead)
    tail = q_end * ALIGN + tl.arange(0, ALIGN)
    tail_mask = tail < V + lead
    nb = tl.cdiv((q_end - 1) * ALIGN, BLOCK)
    if y == ignore_index:  # loss 0, gradient 0, lse not computed
        tl.store(LOSS + row, tl.zeros((), ACC))
        tl.store(LSE + row, tl.full((), float("nan"), ACC))
        if WANT_GRAD:
            zero = tl.zeros((ALIGN,), GRAD.dtype.element_ty)
            tl.store(ga + head, zero, mask=head_mask)
            for k in range(0, nb):
                offs = ALIGN + k * BLOCK + tl.arange(0, BLOCK)
                tl.store(ga + offs, tl.zeros((BLOCK,), GRAD.dtype.element_ty),
                         mask=offs // ALIGN < q_end)  # fmt: skip
            tl.store(ga + tail, zero, mask=tail_mask)
        return
    ycs = tl.full((1,), 0, tl.int64) + tl.minimum(tl.maximum(y, 0), V - 1)  # (range-checked)

    m = tl.full((1,), float("-inf"), ACC)
    s = tl.zeros((1,), ACC)
    sz = tl.zeros((1,), ACC)
    w_seen = tl.zeros((1,), ACC)
    uy = tl.zeros((1,), ACC)
    m, s, sz, w_seen, uy = _part_stats(
        xa, head, head_mask, lead, ycs, W, cap, temp, m, s, sz, w_seen, uy, HAS_W, SMOOTH, SOFTCAP,
        TEMP, DEPTH, ACC,
    )  # fmt: skip
    for k in range(0, nb):
        offs = ALIGN + k * BLOCK + tl.arange(0, BLOCK)
        m, s, sz, w_seen, uy = _part_stats(xa, offs, offs // ALIGN < q_end, lead, ycs, W, cap,
                                           temp, m, s, sz, w_seen, uy, HAS_W, SMOOTH, SOFTCAP,
                                           TEMP, DEPTH, ACC)  # fmt: skip
    m, s, sz, w_seen, uy = _part_stats(
        xa, tail, tail_mask, lead, ycs, W, cap, temp, m, s, sz, w_seen, uy, HAS_W, SMOOTH, SOFTCAP,
        TEMP, DEPTH, ACC,
    )  # fmt: skip
    log_s = tl.log(s)
    lse = m + log_s
    if HAS_W:
        w_y = tl.load(W + ycs).to(ACC)
    else:
        w_y = tl.full((1,), 1.0, ACC)
    loss = (log_s - (uy - m)) * w_y
    a = w_y
    if SMOOTH:
        if HAS_W:
            w_total = tl.load(WSUM).to(ACC)
        else:
            w_total = tl.zeros((1,), ACC) + V
        smooth = w_total * log_s - sz
        if HAS_W:
            if w_total - w_total != 0.0:  # an inf or NaN weight: torch's terms, one by one
                smooth = tl.zeros((1,), ACC) + _part_smooth(
                    xa, head, head_mask, lead, W, cap, temp, m, log_s, SOFTCAP, TEMP, DEPTH, ACC
                )
                for k in range(0, nb):
                    offs = ALIGN + k * BLOCK + tl.arange(0, BLOCK)
                    smooth += _part_smooth(xa, offs, offs // ALIGN < q_end, lead, W, cap, temp,
                                           m, log_s, SOFTCAP, TEMP, DEPTH, ACC)  # fmt: skip
                smooth += _part_smooth(xa, tail, tail_mask, lead, W, cap, temp, m, log_s,
                                       SOFTCAP, TEMP, DEPTH, ACC)  # fmt: skip
        loss = (1.0 - eps) * loss + (eps / V) * smooth
        a = (1.0 - eps) * w_y + (eps / V) * w_total
    if ZLOSS:
        loss = loss + z_loss * lse * lse
        a = a + 2.0 * z_loss * lse
    tl.store(LOSS + row + tl.arange(0, 1), loss.to(ACC))
    tl.store(LSE + row + tl.arange(0, 1), lse.to(ACC))
    if not WANT_GRAD:
        return
    c = grad_scale(SCALE, row + tl.arange(0, 1), tl.full((1,), 1, tl.int1), HAS_SCALE, ROW_SCALE,
                   ACC)  # fmt: skip
    k_row = a * c / s
    t_term = (1.0 - eps) * w_y * c
    _part_grad(xa, ga, head, head_mask, lead, ycs, W, V, cap, temp, m, k_row, c, t_term, eps,
               HAS_W, SMOOTH, SOFTCAP, TEMP, DEPTH, ACC)  # fmt: skip
    for k in range(0, nb):
        offs = ALIGN + k * BLOCK + tl.arange(0, BLOCK)
        _part_grad(xa, ga, offs, offs // ALIGN < q_end, lead, ycs, W, V, cap, temp, m, k_row, c,
                   t_term, eps, HAS_W, SMOOTH, SOFTCAP, TEMP, DEPTH, ACC)  # fmt: skip
    _part_grad(xa, ga, tail, tail_mask, lead, ycs, W, V, cap, temp, m, k_row, c, t_term, eps,
               HAS_W, SMOOTH, SOFTCAP, TEMP, DEPTH, ACC)  # fmt: skip


@triton.jit
def _prob_q(TG, t_rows, W, cols, valid, V, eps, HAS_W: tl.constexpr, SMOOTH: tl.constexpr,
            ACC: tl.constexpr):  # fmt: skip
    """``q = w ⊙ t'`` of a block (0 off the row)."""
    q = tl.load(t_rows + cols[None, :], mask=valid, other=0.0).to(ACC)
    if SMOOTH:
        q = q * (1.0 - eps) + eps / V
    if HAS_W:
        q = q * tl.load(W + cols, mask=cols < V, other=0.0).to(ACC)[None, :]
    return tl.where(valid, q, 0.0)


@triton.jit(do_not_specialize=["eps_b", "z_b", "cap_b", "temp_b"])
def ce_prob_kernel(
    X, stride_x, TG, stride_t, W, GRAD, stride_g, SCALE, LOSS, LSE,
    M, V, eps_b, z_b, cap_b, temp_b,
    HAS_W: tl.constexpr, SMOOTH: tl.constexpr, ZLOSS: tl.constexpr, SOFTCAP: tl.constexpr,
    TEMP: tl.constexpr, WANT_GRAD: tl.constexpr, HAS_SCALE: tl.constexpr,
    ROW_SCALE: tl.constexpr, ACC: tl.constexpr, DEPTH: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, ONE_TILE: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    in_m = rows < M
    eps = f64(eps_b).to(ACC)
    z_loss = f64(z_b).to(ACC)
    cap = f64(cap_b).to(ACC)
    temp = f64(temp_b).to(ACC)
    x_rows = X + rows[:, None] * stride_x
    t_rows = TG + rows[:, None] * stride_t
    g_rows = GRAD + rows[:, None] * stride_g
    TRANSFORMED: tl.constexpr = SOFTCAP or TEMP

    m = tl.full((ROWS,), float("-inf"), ACC)
    s = tl.zeros((ROWS,), ACC)
    total_q = tl.zeros((ROWS,), ACC)
    if ONE_TILE:
        cols = tl.arange(0, BLOCK)
        valid = in_m[:, None] & (cols[None, :] < V)
        x = tl.load(x_rows + cols[None, :], mask=valid, other=0.0).to(ACC)
        u, du = read(x, cap, temp, SOFTCAP, TEMP, DEPTH)
        u = tl.where(valid, u, float("-inf"))
        q = _prob_q(TG, t_rows, W, cols, valid, V, eps, HAS_W, SMOOTH, ACC)
        m, s, ref, shift = online(u, m, s)
        total_q = tl.sum(q, 1)
    else:
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            valid = in_m[:, None] & (cols[None, :] < V)
            x = tl.load(x_rows + cols[None, :], mask=valid, other=0.0).to(ACC)
            u, du = read(x, cap, temp, SOFTCAP, TEMP, DEPTH)
            u = tl.where(valid, u, float("-inf"))
            m, s, ref, shift = online(u, m, s)
            q = _prob_q(TG, t_rows, W, cols, valid, V, eps, HAS_W, SMOOTH, ACC)
            total_q = total_q + tl.sum(q, 1)
    log_s = tl.log(s)
    lse = m + log_s
    coef = total_q
    if ZLOSS:
        coef = coef + 2.0 * z_loss * lse
    c = grad_scale(SCALE, rows, in_m, HAS_SCALE, ROW_SCALE, ACC)
    k = coef / s

    loss = tl.zeros((ROWS,), ACC)
    if ONE_TILE:
        cols = tl.arange(0, BLOCK)
        valid = in_m[:, None] & (cols[None, :] < V)
        z = u - m[:, None]
        loss = -tl.sum(tl.where(valid, q * (z - log_s[:, None]), 0.0), 1)
        if WANT_GRAD:
            g = (tl.exp(z) * k[:, None] - q) * c[:, None]
            if TRANSFORMED:
                g = g * du
            tl.store(g_rows + cols[None, :], g.to(GRAD.dtype.element_ty), mask=valid)
    else:
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            valid = in_m[:, None] & (cols[None, :] < V)
            x = tl.load(x_rows + cols[None, :], mask=valid, other=0.0).to(ACC)
            u, du = read(x, cap, temp, SOFTCAP, TEMP, DEPTH)
            q = _prob_q(TG, t_rows, W, cols, valid, V, eps, HAS_W, SMOOTH, ACC)
            z = u - m[:, None]
            loss = loss - tl.sum(tl.where(valid, q * (z - log_s[:, None]), 0.0), 1)
            if WANT_GRAD:
                g = (tl.exp(z) * k[:, None] - q) * c[:, None]
                if TRANSFORMED:
                    g = g * du
                tl.store(g_rows + cols[None, :], g.to(GRAD.dtype.element_ty), mask=valid)
    if ZLOSS:
        loss = loss + z_loss * lse * lse
    tl.store(LOSS + rows, loss.to(ACC), mask=in_m)
    tl.store(LSE + rows, lse.to(ACC), mask=in_m)
