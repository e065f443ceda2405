"""Float32 sums of a bfloat16 array kept in 24 bits: the bfloat16 array itself and one byte more.

The linear head sums d(weight) over chunks of rows; torch computes it in one matmul whose
float32 sum is rounded to bfloat16 once. Accumulating in a float32 array takes twice the
gradient's memory (4 bytes an element, then the 2-byte result); rounding the running sum to
bfloat16 after every chunk adds an error per chunk. Here the running sum is a float32 value
cut to its upper 24 bits: the upper 16 bits are the element of the bfloat16 gradient's own
storage, the next 8 bits a byte of a side array. Each chunk's float32 product is added in
float32 and the sum cut back to 24 bits by rounding to odd (the dropped bits, if any are set,
set the lowest kept bit), an error of at most 2**-15 of the sum; the last chunk's sum is
rounded to bfloat16 (nearest even) straight from float32. Rounding to odd keeps NaN a NaN (its
mantissa never becomes 0) and never rounds a finite value up to infinity.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, prange, types
from numba.core.extending import intrinsic

from ._math import f32_to_bf16_bits


@intrinsic
def _pair_f32(typingctx, hi, lo):
    """bfloat16 bits (int16) and the next byte (uint8) as the float32 they begin."""

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        high = builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16))
        low = builder.shl(builder.zext(args[1], i32), ir.Constant(i32, 8))
        return builder.bitcast(builder.or_(high, low), ir.FloatType())

    return types.float32(types.int16, types.uint8), codegen


@intrinsic
def _odd24(typingctx, v):
    """float32 bits cut to the upper 24, rounded to odd (uint32, low byte zero)."""

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        bits = builder.bitcast(args[0], i32)
        kept = builder.and_(bits, ir.Constant(i32, 0xFFFFFF00))
        dropped = builder.icmp_unsigned("!=", builder.and_(bits, ir.Constant(i32, 0xFF)),
                                        ir.Constant(i32, 0))  # fmt: skip
        sticky = builder.shl(builder.zext(dropped, i32), ir.Constant(i32, 8))
        return builder.or_(kept, sticky)

    return types.uint32(types.float32), codegen


def _field(shift: int, result: types.Integer) -> object:
    """An intrinsic: bits ``shift`` and up of a uint32, as the integer type ``result``."""

    @intrinsic
    def field(typingctx, b):
        def codegen(context, builder, sig, args):
            moved = builder.lshr(args[0], ir.Constant(ir.IntType(32), shift))
            return builder.trunc(moved, ir.IntType(result.bitwidth))

        return result(types.uint32), codegen

    return field


_high16 = _field(16, types.int16)  # the bfloat16 bits
_byte1 = _field(8, types.uint8)  # the byte after them


@njit(parallel=True, cache=True)
def add_part(hi, lo, part, first, last):
    """Adds the float32 ``part`` (R, D) into the 24-bit sums of ``hi`` (R, D) bfloat16 bits
    and ``lo`` (R, D) bytes. ``first``: the sums start at ``part`` (their contents are not
    read); ``last``: ``hi`` receives the sums rounded to bfloat16 and ``lo`` is not written."""
    rows, d = part.shape
    for i in prange(rows):
        h, low, p = hi[i], lo[i], part[i]
        if first and last:
            for j in range(d):
                h[j] = f32_to_bf16_bits(p[j])
        elif first:
            for j in range(d):
                b = _odd24(p[j])
                h[j] = _high16(b)
                low[j] = _byte1(b)
        elif last:
            for j in range(d):
                h[j] = f32_to_bf16_bits(_pair_f32(h[j], low[j]) + p[j])
        else:
            for j in range(d):
                b = _odd24(_pair_f32(h[j], low[j]) + p[j])
                h[j] = _high16(b)
                low[j] = _byte1(b)
