"""Triton kernels: softmax and log_softmax over the last dimension, forward and backward.

Forward: ``y = exp(x - m) / s`` (softmax) or ``y = x - m - log s`` (log_softmax), with
``m`` the row max and ``s = Σ exp(x - m)``, computed in float32 (float64 for float64) and
written in the input's dtype. Backward, with ``y`` the forward's output and ``g`` the incoming
gradient: ``y·(g - Σ g·y)`` (softmax) or ``g - exp(y)·Σ g`` (log_softmax), torch's formulas.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import online


@triton.jit
def softmax_kernel(
    X, stride_x, Y, stride_y, M, V,
    LOG: tl.constexpr, ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
    ONE_TILE: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    in_m = rows < M
    x_rows = X + rows[:, None] * stride_x
    y_rows = Y + rows[:, None] * stride_y
    m = tl.full((ROWS,), float("-inf"), ACC)
    s = tl.zeros((ROWS,), ACC)
    if ONE_TILE:
        cols = tl.arange(0, BLOCK)
        valid = in_m[:, None] & (cols[None, :] < V)
        x = tl.load(x_rows + cols[None, :], mask=valid, other=float("-inf")).to(ACC)
        m, s, ref, shift = online(x, m, s)
        if LOG:
            y = x - m[:, None] - tl.log(s)[:, None]
        else:
            y = tl.exp(x - m[:, None]) / s[:, None]
        tl.store(y_rows + cols[None, :], y.to(Y.dtype.element_ty), mask=valid)
    else:
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            valid = in_m[:, None] & (cols[None, :] < V)
            x = tl.load(x_rows + cols[None, :], mask=valid, other=float("-inf")).to(ACC)
            m, s, ref, shift = online(x, m, s)
        log_s = tl.log(s)
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            valid = in_m[:, None] & (cols[None, :] < V)
            x = tl.load(x_rows + cols[None, :], mask=valid, other=float("-inf")).to(ACC)
            if LOG:
                y = x - m[:, None] - log_s[:, None]
            else:
                y = tl.exp(x - m[:, None]) / s[:, None]
            tl.store(y_rows + cols[None, :], y.to(Y.dtype.element_ty), mask=valid)


@triton.jit
def _dot(g, y, LOG: tl.constexpr):
    if LOG:
        return tl.sum(g, 1)
    return tl.sum(g * y, 1)


@triton.jit
def _input_grad(g, y, d, LOG: tl.constexpr):
    if LOG:
        return g - tl.exp(y) * d[:, None]
    return y * (g - d[:, None])


@triton.jit
def softmax_backward_kernel(
    G, stride_g, Y, stride_y, DX, stride_d, M, V,
    LOG: tl.constexpr, ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
    ONE_TILE: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    in_m = rows < M
    g_rows = G + rows[:, None] * stride_g
    y_rows = Y + rows[:, None] * stride_y
    d_rows = DX + rows[:, None] * stride_d
    if ONE_TILE:
        cols = tl.arange(0, BLOCK)
        valid = in_m[:, None] & (cols[None, :] < V)
        g = tl.load(g_rows + cols[None, :], mask=valid, other=0.0).to(ACC)
        y = tl.load(y_rows + cols[None, :], mask=valid, other=0.0).to(ACC)
        d = _dot(g, y, LOG)
        dx = _input_grad(g, y, d, LOG)
        tl.store(d_rows + cols[None, :], dx.to(DX.dtype.element_ty), mask=valid)
    else:
        d = tl.zeros((ROWS,), ACC)
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            valid = in_m[:, None] & (cols[None, :] < V)
            g = tl.load(g_rows + cols[None, :], mask=valid, other=0.0).to(ACC)
            y = tl.load(y_rows + cols[None, :], mask=valid, other=0.0).to(ACC)
            d = d + _dot(g, y, LOG)
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            valid = in_m[:, None] & (cols[None, :] < V)
            g = tl.load(g_rows + cols[None, :], mask=valid, other=0.0).to(ACC)
            y = tl.load(y_rows + cols[None, :], mask=valid, other=0.0).to(ACC)
            dx = _input_grad(g, y, d, LOG)
            tl.store(d_rows + cols[None, :], dx.to(DX.dtype.element_ty), mask=valid)
