"""Sums in a fixed order: the kernels' reductions, written so that their result is set by the
source and not by how LLVM happens to compile them.

A sum over a row is kept in :data:`LANES` partial sums, lane ``l`` adding the elements
``j = l, l + LANES, l + 2·LANES, ...`` in that order; at the end the upper half of the lanes is
added to the lower half, lane by lane, until one lane is left. Every addition is rounded as
written (no fast-math reassociation), so the result is the same whatever vector width,
interleaving, inlining or linking LLVM chooses, in every compilation of every kernel: a kernel
compiled in this process, one loaded from Numba's cache, or the copy of a helper that another
kernel carries all give the same bits. (A reassociated sum is not: Numba links an optimised
copy of each helper into every caller and optimises it again there, and which copy a call
runs depends on what the process compiled or loaded first.)

LLVM vectorises :func:`lane_loop`'s whole groups of :data:`LANES` elements as a plain
elementwise loop and keeps the lanes (stack arrays from :func:`lanes`) in registers, so the
sums cost what a reassociated reduction costs.

- :func:`lanes` makes the partial sums, :func:`lane_loop` runs a per-element step over a row,
  :func:`lane_sum` and :func:`lane_max` finish them.
- :func:`load_row`, :func:`row_key` and :func:`write_scratch` read input rows and write a
  kernel's scratch row (its exponentials) with alias information saying that the two never
  overlap: without it LLVM checks the addresses at run time for every group of lanes.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic, overload
from numba.np.arrayobj import populate_array

from ._math import bf16_bits_to_f32, half_bits_to_f32, key_of

LANES = 64  # partial sums of a reduction: 4 vectors of float32 at 512 bits, 8 of float64

_I32 = ir.IntType(32)


def _splat(builder, x, n):
    undef = ir.Constant(ir.VectorType(x.type, n), ir.Undefined)
    one = builder.insert_element(undef, x, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, undef, ir.Constant(ir.VectorType(_I32, n), [0] * n))


@intrinsic
def lanes(typingctx, value):
    """:data:`LANES` copies of ``value`` in a 1-d array on the calling function's stack (it
    must not outlive the call)."""
    if not isinstance(value, (types.Float, types.Integer)):
        return None
    arrty = types.Array(value, 1, "C")

    def codegen(context, builder, sig, args):
        lty = context.get_data_type(value)
        with builder.goto_entry_block():
            slot = builder.alloca(ir.VectorType(lty, LANES))
        slot.align = 64
        builder.store(_splat(builder, args[0], LANES), slot)
        ary = context.make_array(arrty)(context, builder)
        intp = context.get_value_type(types.intp)
        size = context.get_abi_sizeof(lty)
        populate_array(
            ary,
            data=builder.bitcast(slot, lty.as_pointer()),
            shape=[ir.Constant(intp, LANES)],
            strides=[ir.Constant(intp, size)],
            itemsize=ir.Constant(intp, size),
            meminfo=None,
        )
        return ary._getvalue()

    return arrty(value), codegen


def lane_loop(n, step, main, tail, args):
    """``step(j, lane, main, args)`` for ``j`` in ``[0, n)`` in whole groups of
    :data:`LANES` (``lane = j mod LANES``), then ``step(j, lane, tail, args)`` for the last
    ``n mod LANES`` elements. ``main`` and ``tail`` are tuples of lane arrays, ``j`` is
    unsigned (no wraparound of negative indices). A step writes its lanes itself, as
    ``acc[0][lane] += ...``: Numba's dead-code elimination drops stores into an array unpacked
    from a tuple argument (``s, t = acc``) and, at times, stores made by a function the step
    inlines."""
    raise NotImplementedError  # only callable from jitted code


@overload(lane_loop, inline="always")
def _lane_loop(n, step, main, tail, args):
    def impl(n, step, main, tail, args):
        full = n - n % LANES
        for j0 in range(0, full, LANES):
            for lane in range(LANES):
                step(np.uint64(j0 + lane), lane, main, args)
        for lane in range(n - full):
            step(np.uint64(full + lane), lane, tail, args)

    return impl


def _lane_vectors(context, builder, sig, args):
    out = []
    for arrty, arr in zip(sig.args, args, strict=True):
        data = context.make_array(arrty)(context, builder, arr).data
        vt = ir.VectorType(context.get_data_type(arrty.dtype), LANES)
        out.append(builder.load(builder.bitcast(data, vt.as_pointer()), align=64))
    return out


def _lane_arrays(main, tail, kind):
    return (
        isinstance(main, types.Array)
        and main == tail
        and main.ndim == 1
        and isinstance(main.dtype, kind)
    )


@intrinsic
def lane_sum(typingctx, main, tail):
    """``Σ_l (main[l] + tail[l])`` of two lane arrays: lane by lane, then the upper half of
    the lanes added to the lower half until one is left (each addition rounded)."""
    if not _lane_arrays(main, tail, types.Float):
        return None

    def codegen(context, builder, sig, args):
        a, b = _lane_vectors(context, builder, sig, args)
        return halving_sum(builder, builder.fadd(a, b))

    return main.dtype(main, tail), codegen


def halving_sum(builder, v):
    """The sum of the elements of vector ``v`` (a power-of-two length): the upper half added
    to the lower half, element by element, until one is left; each addition rounded."""
    n = v.type.count
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n))))
        hi = builder.shuffle_vector(
            v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n, 2 * n)))
        )
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, ir.Constant(_I32, 0))


@intrinsic
def lane_max(typingctx, main, tail):
    """The largest of the signed integers (order keys) of two lane arrays."""
    if not _lane_arrays(main, tail, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        a, b = _lane_vectors(context, builder, sig, args)
        it = a.type.element
        fn = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(it, [a.type]),
            f"llvm.vector.reduce.smax.v{LANES}i{it.width}",
        )
        both = builder.select(builder.icmp_signed(">", a, b), a, b)
        return builder.call(fn, [both])

    return main.dtype(main, tail), codegen


# ---- rows and scratch rows --------------------------------------------------------------


def _element_pointer(context, builder, arrty, arr, index):
    data = context.make_array(arrty)(context, builder, arr).data
    return builder.gep(data, [index])


def _scopes(builder):
    """Alias scope lists of input rows and of scratch rows (disjoint memory)."""
    mod = builder.module
    domain = mod.add_metadata([ir.MetaDataString(mod, "crossent.rows")])
    rows = mod.add_metadata([ir.MetaDataString(mod, "crossent.rows.input"), domain])
    scratch = mod.add_metadata([ir.MetaDataString(mod, "crossent.rows.scratch"), domain])
    return mod.add_metadata([rows]), mod.add_metadata([scratch])


@intrinsic
def _read(typingctx, arr, index):
    if not isinstance(arr, types.Array) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = builder.load(_element_pointer(context, builder, sig.args[0], args[0], args[1]))
        rows, scratch = _scopes(builder)
        v.set_metadata("alias.scope", rows)
        v.set_metadata("noalias", scratch)
        return v

    return arr.dtype(arr, index), codegen


@intrinsic
def write_scratch(typingctx, arr, index, value):
    """``arr[index] = value`` in a scratch row: memory that no row read by :func:`load_row`
    or :func:`row_key` overlaps (the kernels' per-thread buffers)."""
    if not isinstance(arr, types.Array) or value != arr.dtype:
        return None

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1])
        st = builder.store(args[2], ptr)
        rows, scratch = _scopes(builder)
        st.set_metadata("alias.scope", scratch)
        st.set_metadata("noalias", rows)
        return context.get_dummy_value()

    return types.none(arr, index, value), codegen


def load_row(a, i):
    """``a[i]`` of an input row, widened to the compute dtype as :func:`._math.load` does;
    never a scratch row (see :func:`write_scratch`)."""
    raise NotImplementedError  # only callable from jitted code


@overload(load_row, inline="always")
def _load_row(a, i):
    dt = a.dtype
    if dt in (types.float32, types.float64):
        return lambda a, i: _read(a, i)
    if dt == types.int16:  # bfloat16 bits
        return lambda a, i: bf16_bits_to_f32(_read(a, i))
    if dt == types.uint16:  # float16 bits
        return lambda a, i: half_bits_to_f32(_read(a, i))
    return None


def row_key(a, i):
    """The order key of ``a[i]`` of an input row (as :func:`._math.order_key`)."""
    raise NotImplementedError  # only callable from jitted code


@overload(row_key, inline="always")
def _row_key(a, i):
    return lambda a, i: key_of(_read(a, i))
