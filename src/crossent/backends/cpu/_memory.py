"""How the kernels move memory: wide vectors and streaming (non-temporal) stores.

- :func:`wide_vectors` marks the function it is called from to prefer 512-bit vectors. LLVM
  defaults to 256 bits on AVX-512 CPUs (to avoid frequency drops on older parts); the kernels'
  loops are dominated by the exponential's fused multiply-adds and run faster at full width.
  On CPUs without 512-bit registers the hint has no effect.
- :func:`stream_row` writes a finished row to its destination: the 64-byte-aligned middle
  with non-temporal stores, which bypass the caches and skip the read-for-ownership a normal
  store costs (a third of a kernel's memory traffic); head and tail with ordinary stores.
  :func:`fence` orders those stores before the kernel returns. :func:`stream_row_affine`
  applies ``v·a - b`` (one fused multiply-add) to the row on its way out, so a kernel whose
  last step is that map saves a read and a write of its scratch row.
  :func:`stream_formula` computes an output from one or two input rows (16-bit storage
  widened on load) as it streams it, with no scratch row at all: the softmax and log_softmax
  input gradients, and log_softmax's output. :func:`stream_softmax_grad` streams softmax's
  input gradient of 16-bit rows and, in the same loop, reads the next row's two inputs for
  their dot product: its loads from memory overlap the stores.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.extending import intrinsic

from ._lanes import halving_sum
from ._math import compute_zero, fma, like, load

_WIDE = '"prefer-vector-width"="512"'
_ITEMSIZE = {types.float32: 4, types.float64: 8, types.int16: 2, types.uint16: 2}
# the dtype a source array's elements are computed in (16-bit formats travel as integer bits)
_COMPUTE = {
    types.float32: types.float32,
    types.float64: types.float64,
    types.int16: types.float32,
    types.uint16: types.float32,
}


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


def _splat(builder, x, n):
    undef = ir.Constant(ir.VectorType(x.type, n), ir.Undefined)
    one = builder.insert_element(undef, x, ir.Constant(ir.IntType(32), 0))
    zeros = ir.Constant(ir.VectorType(ir.IntType(32), n), [0] * n)
    return builder.shuffle_vector(one, undef, zeros)


def _widen(builder, v, src_dtype, n):
    """A vector loaded from a source array in the compute dtype: 16-bit bit patterns (bfloat16
    as int16, float16 as uint16) widened to float32, float32 and float64 as they are."""
    if src_dtype == types.int16:
        vi32 = ir.VectorType(ir.IntType(32), n)
        bits = builder.shl(builder.zext(v, vi32), ir.Constant(vi32, [16] * n))
        return builder.bitcast(bits, ir.VectorType(ir.FloatType(), n))
    if src_dtype == types.uint16:
        half = builder.bitcast(v, ir.VectorType(ir.HalfType(), n))
        return builder.fpext(half, ir.VectorType(ir.FloatType(), n))
    return v


def _lane_mask(builder, count, n):
    lanes = ir.Constant(ir.VectorType(ir.IntType(64), n), list(range(n)))
    return builder.icmp_signed("<", lanes, _splat(builder, count, n))


def _load_lanes(context, builder, arrty, arr, index, n, mask):
    """``n`` elements of ``arr`` from ``index`` in the compute dtype (all of them, or with a
    masked load only the lanes of ``mask``)."""
    ptr = _element_pointer(context, builder, arrty, arr, index)
    vt = ir.VectorType(ptr.type.pointee, n)
    i32 = ir.IntType(32)
    align = ir.Constant(i32, arrty.dtype.bitwidth // 8)
    vptr = builder.bitcast(ptr, vt.as_pointer())
    if mask is None:
        v = builder.load(vptr, align=align.constant)
    else:
        masked_load = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(vt, [vt.as_pointer(), i32, mask.type, vt]),
            f"llvm.masked.load.v{n}{_NAMES[vt.element]}.p0",
        )
        v = builder.call(masked_load, [vptr, align, mask, ir.Constant(vt, ir.Undefined)])
    return _widen(builder, v, arrty.dtype, n)


def _store_lanes(context, builder, v, arrty, arr, index, n, mask, nontemporal):
    """Stores the compute-dtype vector ``v`` into ``arr`` from ``index``, rounded to its storage
    dtype: the whole 64-byte line (non-temporally if asked), or with an ordinary masked store
    only the lanes of ``mask``."""
    dp = _element_pointer(context, builder, arrty, arr, index)
    if arrty.dtype == types.int16:
        v = _bf16_bits(builder, v, n)
    elif arrty.dtype == types.uint16:
        half = builder.fptrunc(v, ir.VectorType(ir.HalfType(), n))
        v = builder.bitcast(half, ir.VectorType(ir.IntType(16), n))
    dpv = builder.bitcast(dp, v.type.as_pointer())
    if mask is not None:
        i32 = ir.IntType(32)
        masked_store = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.VoidType(), [v.type, v.type.as_pointer(), i32, mask.type]),
            f"llvm.masked.store.v{n}{_NAMES[v.type.element]}.p0",
        )
        builder.call(masked_store, [v, dpv, ir.Constant(i32, arrty.dtype.bitwidth // 8), mask])
        return
    st = builder.store(v, dpv, align=64)
    if nontemporal:
        one = ir.Constant(ir.IntType(32), 1)
        st.set_metadata("nontemporal", builder.module.add_metadata([one]))


def _line_codegen(context, builder, sig, args, n, partial, nontemporal=True):
    """Stores ``fma(src, a, -b)`` over ``n`` elements from ``index`` into dst's dtype: the whole
    64-byte line non-temporally, or (``partial``) its first ``count`` lanes with a masked load
    and an ordinary masked store, touching nothing else. A 16-bit source is widened to float32
    first."""
    src, dst, index, a, b = args[:5]
    mask = _lane_mask(builder, args[5], n) if partial else None
    v = _load_lanes(context, builder, sig.args[0], src, index, n, mask)
    vt = v.type
    fma_v = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vt, [vt, vt, vt]), f"llvm.fma.v{n}{_NAMES[vt.element]}"
    )
    v = builder.call(fma_v, [v, _splat(builder, a, n), _splat(builder, builder.fneg(b), n)])
    _store_lanes(context, builder, v, sig.args[1], dst, index, n, mask, nontemporal)
    return context.get_dummy_value()


# formulas of :func:`stream_formula`, on rows y and g and scalars c1, c2 (as written: each
# operation rounded, except the one fused multiply-add)
SOFTMAX_GRAD = 0  # y·(g - c1): softmax's input gradient, c1 = Σ g·y
LOG_SOFTMAX_GRAD = 1  # g - y·c1: log_softmax's, y = exp(output), c1 = Σ g (one fma)
LOG_PROBS = 2  # (y - c1) - c2: log_softmax's output, c1 = max, c2 = log Σ exp (g unused)


def _formula_codegen(context, builder, sig, args, n, partial, kind, nontemporal=True):
    """Stores formula ``kind`` over ``n`` elements from ``index`` into dst's dtype: the whole
    line non-temporally, or (``partial``) its first ``count`` lanes."""
    y, g, dst, index, c1, c2 = args[:6]
    mask = _lane_mask(builder, args[6], n) if partial else None
    vy = _load_lanes(context, builder, sig.args[0], y, index, n, mask)
    v1, v2 = _splat(builder, c1, n), _splat(builder, c2, n)
    if kind == LOG_PROBS:
        v = builder.fsub(builder.fsub(vy, v1), v2)
    else:
        vg = _load_lanes(context, builder, sig.args[1], g, index, n, mask)
        if kind == LOG_SOFTMAX_GRAD:
            vt = vy.type
            fma_v = cgutils.get_or_insert_function(
                builder.module,
                ir.FunctionType(vt, [vt, vt, vt]),
                f"llvm.fma.v{n}{_NAMES[vt.element]}",
            )
            v = builder.call(fma_v, [vy, builder.fneg(v1), vg])
        else:
            v = builder.fmul(vy, builder.fsub(vg, v1))
    _store_lanes(context, builder, v, sig.args[2], dst, index, n, mask, nontemporal)
    return context.get_dummy_value()


_NAMES = {ir.FloatType(): "f32", ir.DoubleType(): "f64", ir.IntType(16): "i16"}


def _dot_codegen(context, builder, sig, args, n):
    """``Σ a·b`` over the ``n`` elements of 16-bit arrays ``a``, ``b`` from ``index``
    (unaligned), as a float64: products (exact) and their sum in float32, as the kernels'
    block dot products of 16-bit rows."""
    a, b, index = args
    va = _load_lanes(context, builder, sig.args[0], a, index, n, None)
    vb = _load_lanes(context, builder, sig.args[1], b, index, n, None)
    r = halving_sum(builder, builder.fmul(va, vb))  # a fixed order (see _lanes)
    return builder.fpext(r, ir.DoubleType())


def _grad_line_dot_intrinsic(nontemporal):
    def typer(typingctx, y, g, dst, index, c, y_next, g_next):
        size = _formula_types(y, g, dst, c, c, types.IntegerLiteral(SOFTMAX_GRAD))
        if size is None or y_next != y or g_next != g or y.dtype.bitwidth != 16:
            return None
        n = 64 // size

        def codegen(context, builder, sig, args):
            y, g, dst, index, c, y_next, g_next = args
            fsig = types.none(*sig.args[:5], sig.args[4])
            _formula_codegen(
                context, builder, fsig, [y, g, dst, index, c, c], n, False, SOFTMAX_GRAD,
                nontemporal,
            )
            dsig = types.float64(sig.args[5], sig.args[6], sig.args[3])
            return _dot_codegen(context, builder, dsig, [y_next, g_next, index], n)

        return types.float64(y, g, dst, index, c, y_next, g_next), codegen

    return intrinsic(typer)


# One line of softmax's gradient y·(g - c) (non-temporally, or with an ordinary store), and
# the float64 Σ y_next·g_next over the same indices of the next row (unaligned loads).
_stream_grad_line_dot = _grad_line_dot_intrinsic(True)
_store_grad_line_dot = _grad_line_dot_intrinsic(False)


@intrinsic
def _stream_line(typingctx, src, dst, index, a, b):
    """``dst[index : index + n] = fma(src, a, -b)[index : index + n]``, n = 64 / itemsize,
    as one non-temporal 64-byte store; ``dst[index]`` must be 64-byte aligned."""
    size = _ITEMSIZE.get(dst.dtype)
    if size is None or not (a == b == src.dtype):
        return None

    def codegen(context, builder, sig, args):
        return _line_codegen(context, builder, sig, args, 64 // size, False)

    return types.none(src, dst, index, a, b), codegen


@intrinsic
def _store_part(typingctx, src, dst, index, a, b, count):
    """As :func:`_stream_line` for the first ``count < n`` elements only, with ordinary
    (masked) stores and no alignment required."""
    size = _ITEMSIZE.get(dst.dtype)
    if size is None or not (a == b == src.dtype):
        return None

    def codegen(context, builder, sig, args):
        return _line_codegen(context, builder, sig, args, 64 // size, True)

    return types.none(src, dst, index, a, b, count), codegen


@intrinsic
def _store_line(typingctx, src, dst, index, a, b):
    """As :func:`_stream_line` with an ordinary (cached) store."""
    size = _ITEMSIZE.get(dst.dtype)
    if size is None or not (a == b == src.dtype):
        return None

    def codegen(context, builder, sig, args):
        return _line_codegen(context, builder, sig, args, 64 // size, False, False)

    return types.none(src, dst, index, a, b), codegen


def _formula_types(y, g, dst, c1, c2, kind):
    size = _ITEMSIZE.get(dst.dtype)
    compute = _COMPUTE.get(y.dtype)
    if size is None or compute is None or not (compute == _COMPUTE.get(g.dtype) == c1 == c2):
        return None
    if not isinstance(kind, types.IntegerLiteral):
        return None
    return size


@intrinsic
def _stream_formula_line(typingctx, y, g, dst, index, c1, c2, kind):
    """``dst[index : index + n] =`` formula ``kind`` (a compile-time constant) as one
    non-temporal 64-byte store (n = 64 / itemsize of dst; ``dst[index]`` 64-byte aligned)."""
    size = _formula_types(y, g, dst, c1, c2, kind)
    if size is None:
        return None
    k = kind.literal_value

    def codegen(context, builder, sig, args):
        return _formula_codegen(context, builder, sig, args, 64 // size, False, k)

    return types.none(y, g, dst, index, c1, c2, kind), codegen


@intrinsic
def _store_formula_line(typingctx, y, g, dst, index, c1, c2, kind):
    """As :func:`_stream_formula_line` with an ordinary (cached) store."""
    size = _formula_types(y, g, dst, c1, c2, kind)
    if size is None:
        return None
    k = kind.literal_value

    def codegen(context, builder, sig, args):
        return _formula_codegen(context, builder, sig, args, 64 // size, False, k, False)

    return types.none(y, g, dst, index, c1, c2, kind), codegen


@intrinsic
def _store_formula_part(typingctx, y, g, dst, index, c1, c2, count, kind):
    """As :func:`_stream_formula_line` for the first ``count < n`` elements only, with
    ordinary (masked) stores and no alignment required."""
    size = _formula_types(y, g, dst, c1, c2, kind)
    if size is None:
        return None
    k = kind.literal_value

    def codegen(context, builder, sig, args):
        return _formula_codegen(context, builder, sig, args, 64 // size, True, k)

    return types.none(y, g, dst, index, c1, c2, count, kind), codegen


@intrinsic
def fence(typingctx):
    """A full memory fence: streaming stores become visible before anything that follows."""

    def codegen(context, builder, sig, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.none(), codegen


@njit(inline="always", cache=True)
def _segment(src, dst, lo, hi, a, b, keep_lo, keep_hi, whole_line, nt):
    """Elements ``lo:hi`` of the row: when they share the segment with kept elements, the
    others are finished in ``src`` first and the segment is copied as it is."""
    if keep_lo < hi and lo < keep_hi:
        for j in range(lo, hi):
            if j < keep_lo or j >= keep_hi:
                src[j] = fma(src[j], a, -b)
        a, b = like(1, a), like(0, a)
    if whole_line and nt:
        _stream_line(src, dst, lo, a, b)
    elif whole_line:
        _store_line(src, dst, lo, a, b)
    elif hi > lo:
        _store_part(src, dst, lo, a, b, hi - lo)


@njit(cache=True)
def stream_row_affine(src, dst, a, b, keep_lo, keep_hi, nt):
    """``dst[:] = src·a - b`` (one rounding, then to dst's storage dtype), bypassing the
    caches, except ``dst[keep_lo:keep_hi] = src[keep_lo:keep_hi]`` as they are (elements
    finished in ``src`` beforehand; ``src`` may be changed around them)."""
    v = dst.shape[0]
    per_line = 64 // dst.itemsize
    head = min(v, ((64 - address(dst) % 64) % 64) // dst.itemsize)
    _segment(src, dst, 0, head, a, b, keep_lo, keep_hi, False, nt)
    lines = (v - head) // per_line
    for q in range(lines):
        lo = head + q * per_line
        _segment(src, dst, lo, lo + per_line, a, b, keep_lo, keep_hi, True, nt)
    _segment(src, dst, head + lines * per_line, v, a, b, keep_lo, keep_hi, False, nt)


@njit(cache=True)
def stream_row(src, dst, nt):
    """``dst[:] = src[:]`` rounded to dst's storage dtype, bypassing the caches."""
    zero = compute_zero(src)
    stream_row_affine(src, dst, like(1, zero), zero, 0, 0, nt)


@njit(inline="always", cache=True)
def _formula_part(y, g, dst, c1, c2, count, kind):
    if kind == SOFTMAX_GRAD:
        _store_formula_part(y, g, dst, 0, c1, c2, count, SOFTMAX_GRAD)
    elif kind == LOG_SOFTMAX_GRAD:
        _store_formula_part(y, g, dst, 0, c1, c2, count, LOG_SOFTMAX_GRAD)
    else:
        _store_formula_part(y, g, dst, 0, c1, c2, count, LOG_PROBS)


# The line loops, one per formula and store kind: a branch inside a loop whose body is a few
# vector instructions would cost about a tenth of its time.
@njit(inline="always", cache=True)
def _formula_lines(y, g, dst, head, lines, c1, c2, kind, nt):
    per_line = 64 // dst.itemsize
    if kind == SOFTMAX_GRAD and nt:
        for q in range(lines):
            _stream_formula_line(y, g, dst, head + q * per_line, c1, c2, SOFTMAX_GRAD)
    elif kind == SOFTMAX_GRAD:
        for q in range(lines):
            _store_formula_line(y, g, dst, head + q * per_line, c1, c2, SOFTMAX_GRAD)
    elif kind == LOG_SOFTMAX_GRAD and nt:
        for q in range(lines):
            _stream_formula_line(y, g, dst, head + q * per_line, c1, c2, LOG_SOFTMAX_GRAD)
    elif kind == LOG_SOFTMAX_GRAD:
        for q in range(lines):
            _store_formula_line(y, g, dst, head + q * per_line, c1, c2, LOG_SOFTMAX_GRAD)
    elif nt:
        for q in range(lines):
            _stream_formula_line(y, g, dst, head + q * per_line, c1, c2, LOG_PROBS)
    else:
        for q in range(lines):
            _store_formula_line(y, g, dst, head + q * per_line, c1, c2, LOG_PROBS)


@njit(cache=True)
def stream_formula(kind, y, g, dst, c1, c2, nt):
    """``dst[:] =`` formula ``kind`` (:data:`SOFTMAX_GRAD`, :data:`LOG_SOFTMAX_GRAD`,
    :data:`LOG_PROBS`) of the rows ``y`` and ``g`` (16-bit storage widened on load) and the
    scalars ``c1``, ``c2``, rounded to dst's storage dtype, bypassing the caches when ``nt``
    (else with ordinary stores, the same values)."""
    v = dst.shape[0]
    per_line = 64 // dst.itemsize
    head = min(v, ((64 - address(dst) % 64) % 64) // dst.itemsize)
    if head > 0:
        _formula_part(y, g, dst, c1, c2, head, kind)
    lines = (v - head) // per_line
    _formula_lines(y, g, dst, head, lines, c1, c2, kind, nt)
    tail = head + lines * per_line
    if v > tail:
        _formula_part(y[tail:], g[tail:], dst[tail:], c1, c2, v - tail, kind)


@njit(inline="always", cache=True)
def _dot_range(a, b, lo, hi):
    """``Σ a·b`` over elements ``lo:hi`` (a row's head or tail) of 16-bit rows."""
    s = 0.0
    for j in range(lo, hi):
        s += np.float64(load(a, j) * load(b, j))
    return s


@njit(cache=True)
def stream_softmax_grad(y, g, dst, c, y_next, g_next, nt):
    """``dst[:] = y·(g - c)`` as :func:`stream_formula` (:data:`SOFTMAX_GRAD`) for 16-bit rows,
    and returns ``Σ g_next·y_next`` (rows of the same length and dtype as ``y`` and ``g``),
    read line by line in the same loop (float32 within a line, float64 across lines)."""
    v = dst.shape[0]
    per_line = 64 // dst.itemsize
    head = min(v, ((64 - address(dst) % 64) % 64) // dst.itemsize)
    s = 0.0
    if head > 0:
        _store_formula_part(y, g, dst, 0, c, c, head, SOFTMAX_GRAD)
        s += _dot_range(g_next, y_next, 0, head)
    lines = (v - head) // per_line
    if nt:  # two loops: see _formula_lines
        for q in range(lines):
            s += _stream_grad_line_dot(y, g, dst, head + q * per_line, c, y_next, g_next)
    else:
        for q in range(lines):
            s += _store_grad_line_dot(y, g, dst, head + q * per_line, c, y_next, g_next)
    tail = head + lines * per_line
    if v > tail:
        _store_formula_part(y[tail:], g[tail:], dst[tail:], 0, c, c, v - tail, SOFTMAX_GRAD)
        s += _dot_range(g_next, y_next, tail, v)
    return s
