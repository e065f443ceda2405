"""Scalar building blocks of the fused CPU kernels, all inlined into vectorised loops.

- Bit casts between integers and floats (LLVM ``bitcast``), used to build ``2**k`` and to
  convert the 16-bit float formats.
- A vectorisable ``exp``: libm's ``exp`` is an opaque call that stops LLVM's loop vectoriser,
  so we evaluate ``exp(t) = 2**k · P(r)`` with Cody–Waite range reduction (``t = k·ln2 + r``,
  ``|r| <= ln2/2``, ln2 split into an exact high part and a low part) and a minimax polynomial
  (Cephes' ``expf`` coefficients for float32; a degree-13 Taylor polynomial for float64),
  written with explicit fused multiply-adds, so that its rounding is fixed whatever fast-math
  flags the loop it is inlined into carries.
  Maximum error, measured over ``[-87, 0]`` (float32) and ``[-708, 0]`` (float64) in
  ``tests/test_cpu_backend.py``: 1 ulp (float32) and 2 ulp (float64). Arguments are shifted
  logits ``t = x - max <= 0``; anything below the smallest normal result gives exactly 0.
  Where the results end up rounded to a 16-bit float (bfloat16 or float16 logits), a degree-4
  polynomial with a one-step reduction does (relative error below 6e-6, tested): a fifth of
  a float16 half-ulp and 1/300 of a bfloat16 one, for about a fifth less time per kernel.
- A vectorisable ``tanh`` for soft-capping (Cephes' polynomial / rational function below 0.625,
  ``(1 - e)/(1 + e)`` with ``e = exp(-2|t|)`` above): at most 1.5 ulp in float32 and float64,
  measured in the same test file.
- Loads and stores of the storage dtypes: float32 and float64 natively; bfloat16 travels as
  ``int16`` bits and float16 as ``uint16`` bits (NumPy has no bfloat16 and Numba no float16),
  both widened to float32 on load and rounded to nearest-even on store.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core.extending import intrinsic, overload


@intrinsic
def half_bits_to_f32(typingctx, v):
    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _f32_to_half_bits(typingctx, v):
    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@intrinsic
def bf16_bits_to_f32(typingctx, v):
    """bfloat16 bits (int16) to float32: the bits become the high half of a float32."""

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        wide = builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16))
        return builder.bitcast(wide, ir.FloatType())

    return types.float32(types.int16), codegen


@intrinsic
def f32_to_bf16_bits(typingctx, v):
    """float32 to bfloat16 bits, rounding to nearest even; NaN stays a (quiet) NaN.

    Written as 32-bit integer IR: Numba's own integer arithmetic widens to 64 bits, which
    halves the vector width of the store loops.
    """

    def codegen(context, builder, sig, args):
        i32, i16 = ir.IntType(32), ir.IntType(16)
        bits = builder.bitcast(args[0], i32)
        high = builder.lshr(bits, ir.Constant(i32, 16))
        odd = builder.and_(high, ir.Constant(i32, 1))
        rounded = builder.lshr(
            builder.add(builder.add(bits, ir.Constant(i32, 0x7FFF)), odd), ir.Constant(i32, 16)
        )
        quiet_nan = builder.or_(high, ir.Constant(i32, 0x40))
        is_nan = builder.fcmp_unordered("uno", args[0], args[0])
        return builder.trunc(builder.select(is_nan, quiet_nan, rounded), i16)

    return types.int16(types.float32), codegen


# ---- exp --------------------------------------------------------------------------------
# Every step that rounding matters to is an explicit ``llvm.fma`` call: LLVM never splits or
# regroups an ``fma``, whatever fast-math flags (contraction, reassociation) a loop carries.
# ``k = round(t·log2 e)`` comes from adding a shifter (1.5·2**23 plus the exponent bias) whose
# low mantissa bits then hold the biased exponent, so ``2**k`` is those bits shifted into the
# exponent field.


@intrinsic
def fma(typingctx, a, b, c):
    """``a·b + c`` rounded once (LLVM ``llvm.fma``)."""
    if not (a == b == c and isinstance(a, types.Float)):
        return None

    def codegen(context, builder, sig, args):
        t = args[0].type
        fn = builder.module.declare_intrinsic("llvm.fma", [t], ir.FunctionType(t, [t, t, t]))
        return builder.call(fn, args)

    return a(a, b, c), codegen


@intrinsic
def _pow2_from_shifted(typingctx, z):
    """``2**k`` from ``z = k + shifter``: the low mantissa bits of z moved to the exponent."""
    width = {types.float32: 32, types.float64: 64}.get(z)
    if width is None:
        return None

    def codegen(context, builder, sig, args):
        it = ir.IntType(width)
        bits = builder.bitcast(args[0], it)
        moved = builder.shl(bits, ir.Constant(it, 23 if width == 32 else 52))
        return builder.bitcast(moved, args[0].type)

    return z(z), codegen


_LOG2E_F = np.float32(1.4426950408889634)
_LN2_HI_F = np.float32(0.693359375)  # exact in 9 bits: k·LN2_HI is exact for |k| < 2**15
_LN2_LO_F = np.float32(-2.12194440e-4)
_MIN_F = np.float32(-87.0)  # below: result < 2**-125, flushed to 0
_SHIFT_F = np.float32(1.5 * 2**23 + 127)


@njit(inline="always", cache=True)
def exp_f32(t):
    tt = _MIN_F if t < _MIN_F else t  # NaN stays NaN
    z = fma(tt, _LOG2E_F, _SHIFT_F)
    k = z - _SHIFT_F
    r = fma(k, -_LN2_HI_F, tt)
    r = fma(k, -_LN2_LO_F, r)
    p = fma(np.float32(1.9875691500e-4), r, np.float32(1.3981999507e-3))
    p = fma(p, r, np.float32(8.3334519073e-3))
    p = fma(p, r, np.float32(4.1665795894e-2))
    p = fma(p, r, np.float32(1.6666665459e-1))
    p = fma(p, r, np.float32(5.0000001201e-1))
    p = fma(p, r * r, r) + np.float32(1.0)
    e = p * _pow2_from_shifted(z)
    return np.float32(0.0) if t < _MIN_F else e  # below the range (and -inf): 0


_LN2_F = np.float32(0.6931471805599453)


@njit(inline="always", cache=True)
def exp_f32_short(t):
    """As :func:`exp_f32` with a degree-4 polynomial and a one-step reduction: relative error
    below 6e-6 (2**-17.3), for results rounded to a 16-bit float (whose half ulp is 2**-9 for
    bfloat16 and 2**-12 for float16)."""
    z = fma(t, _LOG2E_F, _SHIFT_F)
    k = z - _SHIFT_F
    r = fma(k, -_LN2_F, t)
    p = fma(np.float32(4.1277595e-2), r, np.float32(1.6753498e-1))
    p = fma(p, r, np.float32(5.0005114e-1))
    p = fma(p, r * r, r) + np.float32(1.0)
    e = p * _pow2_from_shifted(z)
    return np.float32(0.0) if t < _MIN_F else e


_LOG2E_D = 1.4426950408889634
_LN2_HI_D = 6.93145751953125e-1  # Cephes' split of ln 2
_LN2_LO_D = 1.42860682030941723212e-6
_MIN_D = -708.0
_SHIFT_D = 1.5 * 2**52 + 1023


@njit(inline="always", cache=True)
def exp_f64(t):
    tt = _MIN_D if t < _MIN_D else t
    z = fma(tt, _LOG2E_D, _SHIFT_D)
    k = z - _SHIFT_D
    r = fma(k, -_LN2_HI_D, tt)
    r = fma(k, -_LN2_LO_D, r)
    # Taylor to degree 13: |r| <= 0.347 so the remainder r**14/14! < 5e-18
    p = fma(1.6059043836821613e-10, r, 2.08767569878681e-09)
    p = fma(p, r, 2.505210838544172e-08)
    p = fma(p, r, 2.755731922398589e-07)
    p = fma(p, r, 2.7557319223985893e-06)
    p = fma(p, r, 2.48015873015873e-05)
    p = fma(p, r, 1.984126984126984e-04)
    p = fma(p, r, 1.3888888888888889e-03)
    p = fma(p, r, 8.333333333333333e-03)
    p = fma(p, r, 4.1666666666666664e-02)
    p = fma(p, r, 1.6666666666666666e-01)
    p = fma(p, r, 0.5)
    p = fma(p, r * r, r) + 1.0
    e = p * _pow2_from_shifted(z)
    return 0.0 if t < _MIN_D else e


# ---- tanh (soft-capping) ----------------------------------------------------------------
# Odd polynomial (float32) or rational function (float64) of Cephes' tanhf/tanh below 0.625;
# above, (1 - e)/(1 + e) with e = exp(-2|t|) <= exp(-1.25) (the exp above, whose argument is
# then <= 0 as it expects), sign restored. Callers compile with NumPy's error model so that the
# division carries no zero-divisor check.


@njit(inline="always", cache=True)
def tanh_f32(t):
    a = abs(t)
    z = t * t
    p = fma(np.float32(-5.70498872745e-3), z, np.float32(2.06390887954e-2))
    p = fma(p, z, np.float32(-5.37397155531e-2))
    p = fma(p, z, np.float32(1.33314422036e-1))
    p = fma(p, z, np.float32(-3.33332819422e-1))
    small = fma(p * z, t, t)
    e = exp_f32(np.float32(-2.0) * a)
    big = (np.float32(1.0) - e) / (np.float32(1.0) + e)
    big = -big if t < 0 else big
    return small if a < np.float32(0.625) else big


@njit(inline="always", cache=True)
def tanh_f64(t):
    a = abs(t)
    z = t * t
    p = fma(fma(-9.64399179425052238628e-1, z, -9.92877231001918586564e1), z,
            -1.61468768441708447952e3)
    q = fma(fma(z + 1.12811678491632931402e2, z, 2.23548839060100448583e3), z,
            4.84406305325125486048e3)
    small = fma(z * p / q, t, t)
    e = exp_f64(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    big = -big if t < 0 else big
    return small if a < 0.625 else big


def fast_tanh(t):
    """``tanh`` in the compute dtype (dispatches on float32/float64)."""
    raise NotImplementedError  # only callable from jitted code


@overload(fast_tanh, inline="always")
def _fast_tanh(t):
    if t == types.float32:
        return lambda t: tanh_f32(t)
    if t == types.float64:
        return lambda t: tanh_f64(t)
    return None


def fast_exp(t):
    """``exp`` of a shifted logit in the compute dtype (dispatches on float32/float64)."""
    raise NotImplementedError  # only callable from jitted code


@overload(fast_exp, inline="always")
def _fast_exp(t):
    if t == types.float32:
        return lambda t: exp_f32(t)
    if t == types.float64:
        return lambda t: exp_f64(t)
    return None


# ---- loads and stores of the storage dtypes --------------------------------------------


def exp_for(a, t):
    """``exp(t)`` for a result derived from elements of array ``a``: :func:`exp_f32_short` when
    ``a`` holds 16-bit floats (the result is rounded to 16 bits), else :func:`fast_exp`."""
    raise NotImplementedError


@overload(exp_for, inline="always")
def _exp_for(a, t):
    if a.dtype in (types.int16, types.uint16) and t == types.float32:
        return lambda a, t: exp_f32_short(t)
    return lambda a, t: fast_exp(t)


def load(a, i):
    """``a[i]`` widened to the compute dtype (float32, or float64 for float64 storage)."""
    raise NotImplementedError


@overload(load, inline="always")
def _load(a, i):
    dt = a.dtype
    if dt in (types.float32, types.float64):
        return lambda a, i: a[i]
    if dt == types.int16:  # bfloat16 bits: the high half of a float32
        return lambda a, i: bf16_bits_to_f32(a[i])
    if dt == types.uint16:  # float16 bits
        return lambda a, i: half_bits_to_f32(a[i])
    return None


def store(a, i, v):
    """``a[i] = v`` rounded to the storage dtype of ``a`` (round to nearest even)."""
    raise NotImplementedError


@overload(store, inline="always")
def _store(a, i, v):
    dt = a.dtype
    if dt in (types.float32, types.float64):

        def impl(a, i, v):
            a[i] = v

        return impl
    if dt == types.int16:

        def impl_bf16(a, i, v):
            a[i] = f32_to_bf16_bits(np.float32(v))

        return impl_bf16
    if dt == types.uint16:

        def impl_f16(a, i, v):
            a[i] = _f32_to_half_bits(np.float32(v))

        return impl_f16
    return None


def compute_zero(a):
    """0 in the compute dtype of array ``a``'s elements (float64 for float64, else float32)."""
    raise NotImplementedError


@overload(compute_zero, inline="always")
def _compute_zero(a):
    if a.dtype == types.float64:
        return lambda a: np.float64(0)
    if a.dtype in (types.float32, types.int16, types.uint16):
        return lambda a: np.float32(0)
    return None


def like(v, ref):
    """``v`` converted to the float type of ``ref`` (keeps float32 loops in float32)."""
    raise NotImplementedError


@overload(like, inline="always")
def _like(v, ref):
    if ref == types.float32:
        return lambda v, ref: np.float32(v)
    if ref == types.float64:
        return lambda v, ref: np.float64(v)
    return None


# ---- max through order keys -------------------------------------------------------------
# A float's bits, read as a signed integer and with the magnitude bits flipped when the sign
# is set, order like the floats themselves (-0 just below +0; NaN with a clear sign bit above
# +inf, with a set one below -inf). An integer max of such keys vectorises inside any loop,
# which LLVM's maxNum reduction does not when the loop also sums something else: this is how
# a kernel finds the next row's max while it evaluates this row's exponentials.

_KEY_BITS = {types.float32: 32, types.float64: 64, types.int16: 16, types.uint16: 16}


def _flip(builder, bits):
    """Signed-order key of float bits (an involution: it also maps a key back to its bits)."""
    it = bits.type
    sign = builder.ashr(bits, ir.Constant(it, it.width - 1))
    return builder.xor(bits, builder.lshr(sign, ir.Constant(it, 1)))


@intrinsic
def key_of(typingctx, v):
    width = _KEY_BITS.get(v)
    if width is None:
        return None
    key_type = types.int64 if width == 64 else types.int32 if width == 32 else types.int16

    def codegen(context, builder, sig, args):
        return _flip(builder, builder.bitcast(args[0], ir.IntType(width)))

    return key_type(v), codegen


@intrinsic
def kmax(typingctx, a, b):
    """Signed integer max (LLVM ``llvm.smax``) of two keys."""
    if a != b or not isinstance(a, types.Integer) or not a.signed:
        return None

    def codegen(context, builder, sig, args):
        t = args[0].type
        fn = builder.module.declare_intrinsic("llvm.smax", [t], ir.FunctionType(t, [t, t]))
        return builder.call(fn, args)

    return a(a, b), codegen


@intrinsic
def _bits_of_key(typingctx, k):
    if not isinstance(k, types.Integer) or not k.signed or k.bitwidth not in (16, 32, 64):
        return None
    result = {16: types.int16, 32: types.float32, 64: types.float64}[k.bitwidth]

    def codegen(context, builder, sig, args):
        bits = _flip(builder, args[0])
        return bits if k.bitwidth == 16 else builder.bitcast(bits, context.get_value_type(result))

    return result(k), codegen


def order_key(a, i):
    """The order key of ``a[i]`` (an integer as wide as its storage dtype)."""
    raise NotImplementedError


@overload(order_key, inline="always")
def _order_key(a, i):
    if a.dtype in _KEY_BITS:
        return lambda a, i: key_of(a[i])
    return None


def from_key(a, k):
    """The element of ``a``'s storage dtype whose key is ``k``, in the compute dtype."""
    raise NotImplementedError


@overload(from_key, inline="always")
def _from_key(a, k):
    dt = a.dtype
    if dt in (types.float32, types.float64):
        return lambda a, k: _bits_of_key(k)
    if dt == types.int16:
        return lambda a, k: bf16_bits_to_f32(_bits_of_key(k))
    if dt == types.uint16:
        return lambda a, k: half_bits_to_f32(np.uint16(_bits_of_key(k)))
    return None


@intrinsic
def fmax(typingctx, a, b):
    """IEEE maxNum (LLVM ``llvm.maxnum``): a max reduction LLVM can vectorise."""
    if a != b or not isinstance(a, types.Float):
        return None

    def codegen(context, builder, sig, args):
        t = args[0].type
        fn = builder.module.declare_intrinsic("llvm.maxnum", [t], ir.FunctionType(t, [t, t]))
        return builder.call(fn, args)

    return a(a, b), codegen
