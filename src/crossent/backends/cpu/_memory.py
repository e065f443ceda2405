"""How the kernels move memory: wide vectors, prefetches and streaming (non-temporal) stores.

- :func:`wide_vectors` marks the function it is called from to prefer 512-bit vectors. LLVM
  defaults to 256 bits on AVX-512 CPUs (to avoid frequency drops on older parts); the kernels'
  loops are dominated by the exponential's fused multiply-adds and run faster at full width.
  On CPUs without 512-bit registers the hint has no effect.
- :func:`prefetch` asks for one cache line of an array (into L2) ahead of its use.
- :func:`stream_row` writes a finished row to its destination: the 64-byte-aligned middle
  with non-temporal stores, which bypass the caches and skip the read-for-ownership a normal
  store costs (a third of a kernel's memory traffic); head and tail with ordinary stores.
  :func:`fence` orders those stores before the kernel returns.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core.extending import intrinsic

from ._math import store

_WIDE = '"prefer-vector-width"="512"'
_ITEMSIZE = {types.float32: 4, types.float64: 8, types.int16: 2, types.uint16: 2}


@intrinsic
def wide_vectors(typingctx):
    """Let LLVM use 512-bit vectors in the calling function."""

    def codegen(context, builder, sig, args):
        # llvmlite's attribute set only accepts attributes without values; this one is a
        # string attribute, written into the IR as it is.
        set.add(builder.function.attributes, _WIDE)
        return context.get_dummy_value()

    return types.none(), codegen


def _element_pointer(context, builder, arrty, arr, index):
    data = context.make_array(arrty)(context, builder, arr).data
    return builder.gep(data, [index])


@intrinsic
def prefetch(typingctx, arr, index):
    """Prefetch the cache line holding ``arr[index]`` for reading (into L2)."""

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1])
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = builder.module.declare_intrinsic(
            "llvm.prefetch", [i8p], ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        )
        rw, locality, data = ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)
        builder.call(fn, [builder.bitcast(ptr, i8p), rw, locality, data])
        return context.get_dummy_value()

    return types.none(arr, index), codegen


@intrinsic
def address(typingctx, arr):
    """The address of ``arr``'s first element."""

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        return builder.ptrtoint(data, ir.IntType(64))

    return types.int64(arr), codegen


def _bf16_bits(builder, v, n):
    """float32 vector to bfloat16 bits, nearest even, NaN kept quiet (as ``_math.store``)."""
    i32 = ir.IntType(32)
    vi32 = ir.VectorType(i32, n)

    def splat(c):
        return ir.Constant(vi32, [c] * n)

    bits = builder.bitcast(v, vi32)
    high = builder.lshr(bits, splat(16))
    odd = builder.and_(high, splat(1))
    rounded = builder.lshr(builder.add(builder.add(bits, splat(0x7FFF)), odd), splat(16))
    quiet_nan = builder.or_(high, splat(0x40))
    is_nan = builder.fcmp_unordered("uno", v, v)
    return builder.trunc(
        builder.select(is_nan, quiet_nan, rounded), ir.VectorType(ir.IntType(16), n)
    )


@intrinsic
def _stream_line(typingctx, src, dst, index):
    """``dst[index : index + n] = src[index : index + n]``, n = 64 / itemsize, as one
    non-temporal 64-byte store; ``dst[index]`` must be 64-byte aligned."""
    size = _ITEMSIZE.get(dst.dtype)
    if size is None:
        return None
    n = 64 // size

    def codegen(context, builder, sig, args):
        sp = _element_pointer(context, builder, sig.args[0], args[0], args[2])
        dp = _element_pointer(context, builder, sig.args[1], args[1], args[2])
        vt = ir.VectorType(sp.type.pointee, n)
        v = builder.load(
            builder.bitcast(sp, vt.as_pointer()), align=sig.args[0].dtype.bitwidth // 8
        )
        if dst.dtype == types.int16:
            v = _bf16_bits(builder, v, n)
        elif dst.dtype == types.uint16:
            half = builder.fptrunc(v, ir.VectorType(ir.HalfType(), n))
            v = builder.bitcast(half, ir.VectorType(ir.IntType(16), n))
        st = builder.store(v, builder.bitcast(dp, v.type.as_pointer()), align=64)
        st.set_metadata(
            "nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)])
        )
        return context.get_dummy_value()

    return types.none(src, dst, index), codegen


@intrinsic
def fence(typingctx):
    """A full memory fence: streaming stores become visible before anything that follows."""

    def codegen(context, builder, sig, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.none(), codegen


@njit(cache=True)
def stream_row(src, dst):
    """``dst[:] = src[:]`` rounded to dst's storage dtype, bypassing the caches."""
    v = dst.shape[0]
    per_line = 64 // dst.itemsize
    head = min(v, ((64 - address(dst) % 64) % 64) // dst.itemsize)
    for j in range(head):
        store(dst, j, src[j])
    lines = (v - head) // per_line
    for q in range(lines):
        _stream_line(src, dst, head + q * per_line)
    for j in range(head + lines * per_line, v):
        store(dst, j, src[j])
