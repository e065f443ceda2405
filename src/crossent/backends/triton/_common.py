"""Pieces every Triton kernel of the backend shares: scalar arguments, the logit transform,
the online max / Σ exp statistics of a block of rows.

Kernels work on tiles of ``ROWS`` rows by ``BLOCK`` columns. With ``ONE_TILE`` the whole row
fits in one tile: it is read once, and every output (statistics, gradient) comes from the
registers; otherwise the kernel loops over column blocks (one pass for the statistics, one for
the outputs). Offsets are 64-bit (row index times stride).

Float scalars arrive as the bit pattern of their float64 value (:func:`f64`), so that a
float64 problem sees the option as given, and a new value never compiles a new kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def f64(bits):
    """The float64 whose bit pattern is the integer ``bits``."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def tanh(z, DEPTH: tl.constexpr):
    """tanh, to the accuracy of ``z``'s dtype: Lambert's continued fraction of depth ``DEPTH``
    where ``|z| < 0.625`` (4 is exact to 1e-9, 7 to float64 rounding), ``(1 - e)/(1 + e)`` with
    ``e = exp(-2|z|)`` elsewhere (no cancellation there: ``e < 0.29``); ±1 at ±inf, NaN at
    NaN."""
    a = tl.abs(z)
    z2 = z * z
    t = z2 * 0.0 + (2 * DEPTH + 1)
    for k in tl.static_range(DEPTH, 0, -1):
        t = (2 * k - 1) + z2 / t
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(z < 0.0, -big, big)
    return tl.where(a < 0.625, z / t, big)


@triton.jit
def read(x, cap, temp, SOFTCAP: tl.constexpr, TEMP: tl.constexpr, DEPTH: tl.constexpr):
    """The logits as the loss reads them, ``u = cap·tanh(x / cap) / temp``, and ``du/dx``
    (meaningful only when a transform is on)."""
    u = x
    du = x * 0.0 + 1.0
    if SOFTCAP:
        th = tanh(x / cap, DEPTH)
        u = th * cap
        du = 1.0 - th * th
    if TEMP:
        u = u / temp
        du = du / temp
    return u, du


@triton.jit
def online(u, m, s):
    """The running row max ``m`` and ``s = Σ exp(u - m)`` updated with the block ``u``
    ``(ROWS, BLOCK)`` (masked entries -inf). Returns the new max, the new sum, the finite
    reference point of the new max and the shift ``prev ref - new ref`` of what came before.
    While every logit so far is -inf the reference is 0 (exp(-inf) = 0 then, where
    -inf - -inf would be NaN); a NaN logit still gives NaN."""
    m_new = tl.maximum(m, tl.max(u, 1))
    ref = tl.where(m_new == float("-inf"), 0.0, m_new).to(u.dtype)
    prev = tl.where(m == float("-inf"), ref, m).to(u.dtype)
    shift = prev - ref
    s = s * tl.exp(shift) + tl.sum(tl.exp(u - ref[:, None]), 1)
    return m_new, s, ref, shift


@triton.jit
def grad_scale(SCALE, rows, in_m, HAS_SCALE: tl.constexpr, ROW_SCALE: tl.constexpr,
               ACC: tl.constexpr):  # fmt: skip
    """The gradient scale of each of ``rows``: 1, the one value at ``SCALE``, or one per row."""
    c = tl.full(in_m.shape, 1.0, ACC)
    if HAS_SCALE:
        if ROW_SCALE:
            c = tl.load(SCALE + rows, mask=in_m, other=0.0).to(ACC)
        else:
            c = c * tl.load(SCALE).to(ACC)
    return c


# Tile sizes: a row of up to ONE_TILE_MAX columns (SOFTMAX_ONE_TILE_MAX for softmax, whose
# kernels hold less per element) is held whole and read once; shorter rows are packed several
# to a tile of about TILE_ELEMENTS; longer rows are read LOOP_BLOCK_BYTES of input at a time.
# Chosen so that no kernel spills registers when compiled for sm_90 with every option on
# (tests/triton_aot.py checks it). Module attributes, so that tests can send small rows down
# the loop path.
ONE_TILE_MAX = 8192
SOFTMAX_ONE_TILE_MAX = 16384
TILE_ELEMENTS = 4096
MAX_ROWS = 64  # rows per tile: tiles of 2048 elements up to 128 columns, 8 rows from 256
LOOP_BLOCK_BYTES = 16384


def tile(v: int, itemsize: int, softmax: bool = False) -> tuple[int, int, bool, int]:
    """``(rows, block, one_tile, warps)`` for rows of ``v`` columns of ``itemsize`` bytes:
    16 warps for tiles of 4096 elements and more (at most 16 elements per thread in 32-bit
    registers), fewer for smaller ones."""
    limit = SOFTMAX_ONE_TILE_MAX if softmax else ONE_TILE_MAX
    width = triton.next_power_of_2(max(v, 1))
    if width <= limit:
        if width <= 128:
            rows = min(MAX_ROWS, TILE_ELEMENTS // 2 // width)
        else:
            rows = max(1, min(8, TILE_ELEMENTS // width))
        block, one = width, True
    else:
        rows, block, one = 1, max(1, min(width, LOOP_BLOCK_BYTES // itemsize)), False
    n = rows * block
    return rows, block, one, 4 if n <= 1024 else 8 if n <= 2048 else 16


# Few long rows: below SPLIT_ROWS_PER_PROGRAM rows per program of the device's parallelism
# (programs() of the backend: a few per multiprocessor), each row is split into slices read by
# programs of their own, and the slices' statistics merged (the vocabulary-parallel
# primitives on one device). SPLIT_PROGRAMS, when set, stands in for the device's count (the
# tests split rows in Triton's interpreter with it).
SPLIT_PROGRAMS: int | None = None
SPLIT_ROWS_PER_PROGRAM = 0.5


def slices(m: int, v: int, block: int, programs: int) -> tuple[int, int]:
    """``(count, width)`` of the column slices of ``m`` rows of ``v`` columns read in blocks
    of ``block``, for a device that runs ``programs`` programs at once: one slice (width
    ``v``) unless the rows alone leave most of it idle."""
    if programs <= 0 or m >= SPLIT_ROWS_PER_PROGRAM * programs:
        return 1, v
    count = min(triton.cdiv(programs, max(m, 1)), triton.cdiv(v, block))
    width = triton.cdiv(triton.cdiv(v, count), block) * block
    return triton.cdiv(v, width), width
