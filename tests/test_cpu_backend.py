"""The fused CPU backend's own building blocks: exp accuracy, 16-bit conversions, caching,
threads, and memory safety at the edges (the parity grids run it on every option too)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numba import njit

import crossent
from crossent.backends.cpu import _math, _memory, _runtime, as_numpy
from crossent.testing import assert_close_to_oracle, make_logits, make_targets


@njit
def _exp_all(t, out):
    for i in range(t.shape[0]):
        out[i] = _math.fast_exp(t[i])


@njit(fastmath={"reassoc", "nsz", "contract", "arcp"})
def _exp_all_reassociated(t, out):
    # the kernels evaluate exp inside loops that may be reassociated (to vectorise a sum);
    # the sum here makes this loop one of them
    s = t[0] * 0
    for i in range(t.shape[0]):
        v = _math.fast_exp(t[i])
        out[i] = v
        s += v
    return s


@njit
def _exp_short_all(t, out):
    for i in range(t.shape[0]):
        out[i] = _math.exp_f32_short(t[i])


# The shorter exponential used where results are rounded to 16-bit floats: relative error
# below 6e-6 over the range of shifted logits with normal results, exactly 0 below it, NaN
# kept.
def test_exp_f32_short_relative_error() -> None:
    rng = np.random.default_rng(0)
    t = np.concatenate([np.linspace(-87.0, 0.0, 1_000_001), rng.uniform(-87.0, 0.0, 1_000_000)])
    t = t.astype(np.float32)
    out = np.empty_like(t)
    _exp_short_all(t, out)
    exact = np.exp(t.astype(np.longdouble))
    assert float(np.max(np.abs(out - exact) / exact)) < 6e-6
    edge = np.array([-87.5, -1e30, -np.inf, np.nan], dtype=np.float32)
    out = np.empty_like(edge)
    _exp_short_all(edge, out)
    assert (out[:3] == 0).all() and np.isnan(out[3])


def _ulp_error(got: np.ndarray, t: np.ndarray, dtype: type) -> float:
    exact = np.exp(t.astype(np.longdouble))
    ulp = np.spacing(exact.astype(dtype)).astype(np.longdouble)
    return float(np.max(np.abs(got.astype(np.longdouble) - exact) / ulp))


# The documented bounds: 1 ulp (float32) and 2 ulp (float64) over the range of shifted logits
# whose exponential is a normal number; a dense sweep plus random points.
@pytest.mark.parametrize(
    ("dtype", "low", "bound"), [(np.float32, -87.0, 1.0), (np.float64, -708.0, 2.0)]
)
def test_fast_exp_max_ulp_error(dtype: type, low: float, bound: float) -> None:
    rng = np.random.default_rng(0)
    t = np.concatenate([np.linspace(low, 0.0, 1_000_001), rng.uniform(low, 0.0, 1_000_000)])
    t = t.astype(dtype)
    out = np.empty_like(t)
    _exp_all(t, out)
    assert _ulp_error(out, t, dtype) <= bound
    _exp_all_reassociated(t, out)
    assert _ulp_error(out, t, dtype) <= bound


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_exp_special_values(dtype: type) -> None:
    t = np.array([0.0, -np.inf, np.nan, -1e30, -800.0, -100.0, 1e-30], dtype=dtype)
    for run in (_exp_all, _exp_all_reassociated):
        out = np.full_like(t, 7.0)
        run(t, out)
        assert out[0] == 1.0 and out[1] == 0.0 and np.isnan(out[2]) and out[3] == 0.0
        assert out[4] == 0.0  # below every normal result: exactly 0
        assert out[6] == 1.0


@njit
def _roundtrip(src, dst):
    for i in range(src.shape[0]):
        _math.store(dst, i, _math.load(src, i))


@njit
def _store_f32(src, dst):
    for i in range(src.shape[0]):
        _math.store(dst, i, src[i])


@njit(fastmath={"reassoc", "nsz", "contract", "arcp"}, error_model="numpy")
def _tanh_all(t, out):
    # compiled as the soft-capping loops are: reassociation allowed, NumPy's error model
    for i in range(t.shape[0]):
        out[i] = _math.fast_tanh(t[i])


# tanh (soft-capping): at most 1.5 ulp (float32 and float64) against the exact value, both
# branches (|t| < 0.625 and above) and out to saturation; odd, exact
# at 0 and tiny arguments, ±1 at ±inf, NaN for NaN.
@pytest.mark.parametrize(("dtype", "bound"), [(np.float32, 1.5), (np.float64, 1.5)])
def test_fast_tanh_max_ulp_error(dtype: type, bound: float) -> None:
    rng = np.random.default_rng(1)
    t = np.concatenate([
        np.linspace(-20.0, 20.0, 1_000_001), rng.uniform(-1.0, 1.0, 500_000),
        np.geomspace(1e-30, 1.0, 10_000), -np.geomspace(1e-30, 1.0, 10_000),
    ]).astype(dtype)
    out = np.empty_like(t)
    _tanh_all(t, out)
    exact = np.tanh(t.astype(np.longdouble))
    ulp = np.spacing(np.abs(exact).astype(dtype)).astype(np.longdouble)
    assert float(np.max(np.abs(out.astype(np.longdouble) - exact) / ulp)) <= bound
    assert np.array_equal(-out, _tanh_of(-t))
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45], dtype)
    got = _tanh_of(special)
    assert got[0] == 0 and got[2] == 1 and got[3] == -1 and np.isnan(got[4])
    assert got[5] == special[5]


def _tanh_of(t: np.ndarray) -> np.ndarray:
    out = np.empty_like(t)
    _tanh_all(t, out)
    return out


# float32 -> bfloat16/float16 must round exactly as torch's .to() does (nearest even),
# including ties, subnormals, overflow to inf, infinities and NaN.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_store_rounds_like_torch(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    vals = torch.cat([
        torch.randn(100_000, generator=g) * 10.0 ** torch.randint(-8, 6, (100_000,), generator=g),
        torch.tensor([0.0, -0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-9, 65519.0, 65520.0, 1e-8,
                      float("inf"), float("-inf"), 3.0e38]),
    ])
    out = torch.empty(vals.shape, dtype=dtype)
    _store_f32(vals.numpy(), as_numpy(out))
    expected = vals.to(dtype)
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))
    nan_out = torch.empty(1, dtype=dtype)
    _store_f32(np.array([np.nan], np.float32), as_numpy(nan_out))
    assert torch.isnan(nan_out).all()
    # and every 16-bit pattern widens exactly (load), then stores back to itself
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    finite = bits[~torch.isnan(bits)]
    back = torch.empty_like(finite)
    _roundtrip(as_numpy(finite), as_numpy(back))
    assert torch.equal(back.view(torch.int16), finite.view(torch.int16))


def _narrow_emulated(hi: np.ndarray, lo: np.ndarray, part: np.ndarray, first: bool,
                     last: bool) -> tuple[np.ndarray, np.ndarray]:
    """The 24-bit running sums of backends.cpu._sums in NumPy bit operations."""
    hi, lo = hi.copy(), lo.copy()
    if first:
        s = part.copy()
    else:
        bits = (hi.view(np.uint16).astype(np.uint32) << 16) | (lo.astype(np.uint32) << 8)
        with np.errstate(over="ignore"):  # sums of 3e38 and more: inf, as in the kernel
            s = bits.view(np.float32) + part
    if last:
        hi[...] = torch.from_numpy(s).to(torch.bfloat16).view(torch.int16).numpy()
        return hi, lo
    b = s.view(np.uint32)
    b = (b & np.uint32(0xFFFFFF00)) | ((b & np.uint32(0xFF)) != 0).astype(np.uint32) << 8
    hi[...] = (b >> 16).astype(np.uint16).view(np.int16)
    lo[...] = ((b >> 8) & 0xFF).astype(np.uint8)
    return hi, lo


def _same_bf16(got: torch.Tensor, want_bits: np.ndarray) -> None:
    """Bit for bit, NaN payloads aside (torch's rounding and ours quiet a NaN differently)."""
    want = torch.from_numpy(want_bits).view(torch.bfloat16)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    keep = ~torch.isnan(want)
    assert torch.equal(got.view(torch.int16)[keep], want.view(torch.int16)[keep])


# d(weight) of a bfloat16 linear head summed in 24 bits (the gradient's storage and a byte):
# every step of the kernel bit for bit as its NumPy emulation, over chunks that start, add and
# end the sums, with magnitudes 1e-30..1e30, zeros of both signs, infinities, NaN, values
# whose dropped bits are all zero, and sums that overflow float32.
def test_narrow_sums_match_their_emulation() -> None:
    from crossent.backends.cpu import CpuBackend

    be = CpuBackend()
    g = np.random.default_rng(0)
    shape = (37, 53)

    def part() -> np.ndarray:
        p = (g.standard_normal(shape) * 10.0 ** g.integers(-30, 30, shape)).astype(np.float32)
        flat = p.reshape(-1)
        flat[:6] = [0.0, -0.0, np.inf, -np.inf, np.nan, 3.0e38]
        flat[6:20] = np.float32(1.5) * np.float32(2.0) ** g.integers(-20, 20, 14)  # low bits 0
        return p

    for chunks in (1, 2, 5):
        hi = torch.empty(shape, dtype=torch.bfloat16)
        lo = torch.empty(shape, dtype=torch.uint8)
        want_hi, want_lo = as_numpy(hi).copy(), lo.numpy().copy()
        for c in range(chunks):
            p = part()
            first, last = c == 0, c == chunks - 1
            be.add_narrow(hi, lo, torch.from_numpy(p), first, last)
            want_hi, want_lo = _narrow_emulated(want_hi, want_lo, p, first, last)
            _same_bf16(hi, want_hi)
            if not last:
                assert np.array_equal(lo.numpy(), want_lo)
        assert torch.isnan(hi.view(-1)[4]) and hi.view(-1)[2] == float("inf")


@njit
def _stream(src, dst, nt):
    _memory.stream_row(src, dst, nt)
    _memory.fence()


# Rows are streamed with 64-byte-aligned non-temporal stores between an ordinary head and
# tail: every start offset within a cache line and lengths around whole lines must write
# exactly the row (rounded like torch's .to()) and nothing beside it.
@pytest.mark.parametrize("nt", [True, False], ids=["streamed", "cached"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_stream_row_writes_exactly_the_row(dtype: torch.dtype, nt: bool) -> None:
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    per_line = 64 // dtype.itemsize
    g = torch.Generator().manual_seed(0)
    for start in range(per_line):
        for length in (0, 1, per_line - 1, per_line, per_line + 1, 3 * per_line + 5, 1000):
            src = torch.randn(length, generator=g, dtype=compute)
            src[::7] = float("nan") if length > 3 else src[::7]
            dst = torch.full((start + length + per_line,), 5.0, dtype=dtype)
            _stream(as_numpy(src), as_numpy(dst)[start : start + length], nt)
            got = dst[start : start + length]
            assert torch.equal(got.isnan(), src.isnan())
            assert torch.equal(got.nan_to_num(), src.to(dtype).nan_to_num())
            assert (dst[:start] == 5.0).all() and (dst[start + length :] == 5.0).all()


@njit
def _stream_affine(src, dst, a, b, keep_lo, keep_hi, nt):
    _memory.stream_row_affine(src, dst, a, b, keep_lo, keep_hi, nt)
    _memory.fence()


# The affine variant stores fma(src, a, -b) (one rounding, then the storage dtype's) except on
# [keep_lo, keep_hi), which is stored as it is: kept ranges anywhere (head, a streamed line,
# across a line boundary, the tail, empty) must give exactly that, and nothing beside the row.
@pytest.mark.parametrize("nt", [True, False], ids=["streamed", "cached"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_stream_row_affine_writes_exactly_the_row(dtype: torch.dtype, nt: bool) -> None:
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    per_line = 64 // dtype.itemsize
    g = torch.Generator().manual_seed(1)
    a = torch.tensor(0.3712, dtype=compute)
    b = torch.tensor(-0.0421, dtype=compute)
    a_np, b_np = a.numpy()[()], b.numpy()[()]
    for start in (0, 1, per_line // 2, per_line - 1):
        for length in (1, per_line - 1, per_line + 1, 3 * per_line + 5, 1000):
            keeps = {(0, 0), (0, 1), (length - 1, length), (length // 2, length // 2 + 1),
                     (per_line - start - 1, per_line - start + 2), (0, length)}
            for lo, hi in sorted(keeps):
                lo, hi = max(0, min(lo, length)), max(0, min(hi, length))
                src = torch.randn(length, generator=g, dtype=compute)
                # fma's one rounding: the exact value (fractions), rounded to float64, then to
                # float32 for float32 compute
                fa, fb = Fraction(float(a)), Fraction(float(b))
                exact = [float(Fraction(v) * fa - fb) for v in src.tolist()]
                expected = torch.tensor(exact, dtype=torch.float64).to(compute)
                expected[lo:hi] = src[lo:hi]
                dst = torch.full((start + length + per_line,), 5.0, dtype=dtype)
                _stream_affine(as_numpy(src.clone()), as_numpy(dst)[start : start + length],
                               a_np, b_np, lo, hi, nt)
                got = dst[start : start + length]
                assert torch.equal(got, expected.to(dtype)), (start, length, lo, hi)
                assert (dst[:start] == 5.0).all() and (dst[start + length :] == 5.0).all()


def test_auto_selects_cpu_backend_for_cpu_tensors() -> None:
    from crossent import dispatch

    assert dispatch.resolve("auto", torch.zeros(1)).name == "cpu"


# Numba indexes without bounds checks: every target is validated before a kernel runs.
@pytest.mark.parametrize("bad", [5, -1, -101, 2**40])
def test_out_of_range_targets_raise_before_any_kernel(bad: int) -> None:
    x = make_logits((4, 5))
    t = torch.tensor([0, 4, bad, 1])
    with pytest.raises(IndexError, match=f"Target {bad} is out of bounds"):
        crossent.cross_entropy(x, t, backend="cpu")
    with pytest.raises(IndexError, match=f"Target {bad} is out of bounds"):
        crossent.nll_loss(x, t, backend="cpu")


# Targets at both edges of the class range, ignore_index at the edges, V = 1, empty blocks.
@pytest.mark.parametrize(("shape", "targets", "ignore_index"), [
    ((3, 1), [0, 0, 0], -100),             # V = 1: loss 0, gradient 0
    ((4, 7), [0, 6, 0, 6], -100),          # first and last class
    ((4, 7), [0, 6, 6, 0], 6),             # ignore_index is the last class
    ((4, 7), [-1, 0, -1, 6], -1),          # negative ignore_index
    ((4, 7), [7, 7, 7, 7], 7),             # every target ignored, ignore_index = V
    ((0, 7), [], -100),                    # no rows
])
def test_edges_match_torch(shape: tuple[int, int], targets: list[int], ignore_index: int) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        x = make_logits(shape, dtype)
        t = torch.tensor(targets, dtype=torch.int64)
        for reduction in ("none", "sum", "mean"):
            xs = [x.clone().requires_grad_() for _ in range(2)]
            ours = crossent.cross_entropy(xs[0], t, ignore_index=ignore_index,
                                          reduction=reduction, backend="cpu")
            theirs = F.cross_entropy(xs[1], t, ignore_index=ignore_index, reduction=reduction)
            torch.testing.assert_close(ours, theirs, equal_nan=True)
            ours.sum().backward()
            theirs.sum().backward()
            torch.testing.assert_close(xs[0].grad, xs[1].grad, equal_nan=True)


# V of real vocabularies, and one above the largest, against the oracle with torch's own error.
@pytest.mark.parametrize("v", [32000, 50257, 262144])
def test_large_vocabularies_float32(v: int) -> None:
    from crossent import reference

    x = make_logits((3, v), torch.float32, seed=v)
    t = make_targets((3,), v, seed=v)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ours = crossent.cross_entropy(xs[0], t, reduction="sum", label_smoothing=0.1, backend="cpu")
    theirs = F.cross_entropy(xs[1], t, reduction="sum", label_smoothing=0.1)
    ours.backward()
    theirs.backward()
    xn, tn = x.double().numpy(), t.numpy()
    kw = dict(reduction="sum", label_smoothing=0.1)
    assert_close_to_oracle(ours, reference.cross_entropy(xn, tn, **kw), theirs, what="loss")
    grad = reference.cross_entropy_grad(xn, tn, np.float64(1.0), **kw).input
    assert_close_to_oracle(xs[0].grad, grad, xs[1].grad, what="grad")


def test_threads_follow_torch() -> None:
    import numba

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        crossent.cross_entropy(make_logits((4, 9)), make_targets((4,), 9), backend="cpu")
        assert numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_kernels_work_without_any_writable_cache_location() -> None:
    # A read-only installation with an unwritable home: Numba's in-tree and per-user cache
    # locations both refuse (simulated: they raise as an unwritable directory does).
    code = textwrap.dedent("""
        from numba.core import caching

        def refuse(self):
            raise PermissionError("read-only")

        for name in ("InTreeCacheLocator", "UserWideCacheLocator"):
            cls = getattr(caching, name, None) or getattr(caching, "_" + name)
            cls.ensure_cache_path = refuse
        import torch, crossent, torch.nn.functional as F
        x = torch.randn(3, 11); t = torch.tensor([0, 5, 10])
        a = crossent.cross_entropy(x, t, backend="cpu"); b = F.cross_entropy(x, t)
        assert torch.allclose(a, b), (a, b)
        import numba
        from crossent.backends.cpu import _kernels, _runtime
        paths = [_kernels._row_max.stats.cache_path]
        paths += [k.stats.cache_path for k in _runtime._specialised.values()]
        assert len(paths) > 1 and all("crossent-numba-" in p for p in paths), paths
        print("ok", repr(numba.config.CACHE_DIR), *paths)
    """)
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr
    # the kernels write to a private temporary directory; Numba's own setting is left alone
    assert out.stdout.startswith("ok '' ") and "crossent-numba-" in out.stdout


# Long rows in the backward passes: the row sums (Σ g·y, Σ g; 16-bit rows accumulate them in
# float32 block by block) over V = 32000 and 262144 terms must keep the gradient within the
# tolerance rule.
@pytest.mark.parametrize("v", [32000, 262144])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
def test_softmax_backward_long_rows(fn: str, dtype: torch.dtype, v: int) -> None:
    from crossent import reference

    x = make_logits((8, v), dtype, seed=5)
    g = make_logits((8, v), dtype, seed=6, scale=1.0)
    grads = []
    for f in (getattr(crossent, fn), getattr(F, fn)):
        xi = x.clone().requires_grad_()
        kw = {"backend": "cpu"} if f is getattr(crossent, fn) else {}
        f(xi, 1, **kw).backward(g)
        grads.append(xi.grad)
    oracle = getattr(reference, f"{fn}_grad")(x.double().numpy(), 1, g.double().numpy())
    assert_close_to_oracle(grads[0], oracle, grads[1], what="d input")


@njit
def _stream_softmax_grad(y, g, dst, d, log):
    kind = _memory.LOG_SOFTMAX_GRAD if log else _memory.SOFTMAX_GRAD
    _memory.stream_formula(kind, y, g, dst, d, d, True)
    _memory.fence()


@njit
def _stream_softmax_grad_dot(y, g, dst, d, y_next, g_next):
    s = _memory.stream_softmax_grad(y, g, dst, d, y_next, g_next, True)
    _memory.fence()
    return s


# softmax's gradient y·(g - d) and log_softmax's g - e·d are streamed straight from their two
# input rows (of the storage dtype, or e of the compute dtype): every start offset and length
# around whole lines must give exactly the formula (rounded as written, then to the storage
# dtype) and write nothing beside the row. Softmax's of 16-bit rows also comes with the next
# row's Σ g·y read in the same loop: the same output, and that sum within its rounding (exact
# float32 products, float32 sums of at most a line of them).
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_stream_softmax_grad_writes_exactly_the_row(dtype: torch.dtype, log: bool) -> None:
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    per_line = 64 // dtype.itemsize
    gen = torch.Generator().manual_seed(2)
    d = torch.tensor(0.3712, dtype=compute)
    for start in (0, 1, per_line // 2, per_line - 1):
        for length in (1, per_line - 1, per_line, per_line + 1, 3 * per_line + 5, 1000):
            y = torch.rand(length, generator=gen).to(compute if log else dtype)
            g = torch.randn(length, generator=gen).to(dtype)
            yc, gc = y.to(compute), g.to(compute)
            if log:  # one rounding: the exact value, rounded to float64, then to float32
                exact = [
                    float(Fraction(gv) - Fraction(yv) * Fraction(float(d)))
                    for yv, gv in zip(yc.tolist(), gc.tolist(), strict=True)
                ]
                expected = torch.tensor(exact, dtype=torch.float64).to(compute)
            else:
                expected = yc * (gc - d)
            dst = torch.full((start + length + per_line,), 5.0, dtype=dtype)
            _stream_softmax_grad(
                as_numpy(y), as_numpy(g), as_numpy(dst)[start : start + length], d.numpy()[()], log
            )
            got = dst[start : start + length]
            assert torch.equal(got, expected.to(dtype)), (start, length)
            assert (dst[:start] == 5.0).all() and (dst[start + length :] == 5.0).all()
            if log or dtype.itemsize != 2:
                continue
            yn = torch.rand(length, generator=gen).to(dtype)
            gn = torch.randn(length, generator=gen).to(dtype)
            dst = torch.full((start + length + per_line,), 5.0, dtype=dtype)
            dot = _stream_softmax_grad_dot(
                as_numpy(y), as_numpy(g), as_numpy(dst)[start : start + length],
                d.numpy()[()], as_numpy(yn), as_numpy(gn),
            )
            assert torch.equal(dst[start : start + length], expected.to(dtype)), (start, length)
            assert (dst[:start] == 5.0).all() and (dst[start + length :] == 5.0).all()
            products = yn.double() * gn.double()
            bound = per_line * 2.0**-24 * float(products.abs().sum())
            assert abs(dot - float(products.sum())) <= bound, (start, length, dot)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_stream_log_probs_writes_exactly_the_row(dtype: torch.dtype) -> None:
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    per_line = 64 // dtype.itemsize
    gen = torch.Generator().manual_seed(3)
    c1, c2 = torch.tensor(1.8125, dtype=compute), torch.tensor(0.7317, dtype=compute)
    for start in (0, 1, per_line // 2, per_line - 1):
        for length in (1, per_line - 1, per_line, per_line + 1, 3 * per_line + 5, 1000):
            x = (torch.randn(length, generator=gen) * 4).to(dtype)
            expected = (x.to(compute) - c1) - c2
            dst = torch.full((start + length + per_line,), 5.0, dtype=dtype)
            xn = as_numpy(x)
            _stream_log_probs(xn, as_numpy(dst)[start : start + length], c1.numpy()[()],
                              c2.numpy()[()])
            got = dst[start : start + length]
            assert torch.equal(got, expected.to(dtype)), (start, length)
            assert (dst[:start] == 5.0).all() and (dst[start + length :] == 5.0).all()


@njit
def _stream_log_probs(x, dst, c1, c2):
    _memory.stream_formula(_memory.LOG_PROBS, x, x, dst, c1, c2, True)
    _memory.fence()


# The softmax kernels stream large outputs straight from their inputs and write small ones
# through their scratch row; both ways must agree bit for bit, over row lengths that are and
# are not whole lines and blocks.
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v", [1, 17, 1024, 1031, 3000])
def test_softmax_bwd_streamed_equals_cached(dtype: torch.dtype, log: bool, v: int) -> None:
    from crossent.backends.cpu import _kernels

    gen = torch.Generator().manual_seed(v)
    x = torch.randn(13, v, generator=gen, dtype=torch.float64) * 3
    y = (torch.log_softmax if log else torch.softmax)(x, -1).to(dtype)
    g = torch.randn(13, v, generator=gen).to(dtype)
    proto = np.empty(0, dtype=np.float64 if dtype == torch.float64 else np.float32)
    outs = []
    for nt in (True, False):
        out = torch.empty_like(y)
        _runtime.specialised(_kernels.softmax_bwd_kernel, log)(
            as_numpy(g), as_numpy(y), as_numpy(out), proto, nt
        )
        outs.append(out)
    assert torch.equal(outs[0].view(-1).view(torch.uint8), outs[1].view(-1).view(torch.uint8))


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v", [1, 17, 1024, 1031, 3000])
def test_softmax_fwd_streamed_equals_cached(dtype: torch.dtype, log: bool, v: int) -> None:
    from crossent.backends.cpu import _kernels

    gen = torch.Generator().manual_seed(v)
    x = (torch.randn(13, v, generator=gen) * 3).to(dtype)
    x[3, v // 2] = float("-inf")
    x[5, 0] = float("nan")
    proto = np.empty(0, dtype=np.float64 if dtype == torch.float64 else np.float32)
    outs = []
    for nt in (True, False):
        out = torch.empty_like(x)
        _runtime.specialised(_kernels.softmax_fwd_kernel, log)(
            as_numpy(x), as_numpy(out), proto, nt
        )
        outs.append(out)
    assert torch.equal(outs[0].view(-1).view(torch.uint8), outs[1].view(-1).view(torch.uint8))


# The row max through integer order keys (how a row's exponential pass finds the next row's
# max): the float max of every storage dtype, with -inf, both zeros and huge values; a NaN
# whose sign bit is clear comes out as NaN (the row is then NaN anyway), one whose sign bit is
# set is passed over as maxNum passes over NaN.
@njit
def _key_max(a):
    k = _math.order_key(a, 0)
    for j in range(a.shape[0]):
        k = _math.kmax(k, _math.order_key(a, j))
    return _math.from_key(a, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_order_key_max_is_the_float_max(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(7)
    big = torch.finfo(dtype).max
    rows = [
        torch.randn(33, generator=gen, dtype=torch.float64) * 100,
        -torch.rand(9, generator=gen, dtype=torch.float64) - 1,  # all negative
        torch.tensor([-0.0, -3.0, 0.0, -1.0], dtype=torch.float64),
        torch.tensor([-0.0, -3.0, -1.0], dtype=torch.float64),
        torch.tensor([-math.inf, -math.inf], dtype=torch.float64),
        torch.tensor([-math.inf, -2.0, -math.inf], dtype=torch.float64),
        torch.tensor([1.0, math.inf, 2.0], dtype=torch.float64),
        torch.tensor([-big, big, 0.5], dtype=torch.float64),
        torch.tensor([5.0], dtype=torch.float64),
    ]
    for row in rows:
        r = row.to(dtype)
        got = _key_max(as_numpy(r))
        want = float(r.max())
        assert got == want and math.copysign(1, got) == math.copysign(1, want), (row, got)
    r = torch.tensor([1.0, 3.0, 2.0], dtype=dtype)
    r[1] = math.nan  # sign bit clear: above +inf
    assert math.isnan(_key_max(as_numpy(r)))
    _negative_nan(r, 1)  # sign bit set: below -inf
    assert _key_max(as_numpy(r)) == 2.0


def _negative_nan(row: torch.Tensor, j: int) -> None:
    """Writes a quiet NaN with its sign bit set (conversions may drop the sign of a NaN)."""
    bits = {torch.float32: (torch.int32, -(1 << 22)), torch.float64: (torch.int64, -(1 << 51)),
            torch.bfloat16: (torch.int16, -64), torch.float16: (torch.int16, -512)}
    itype, value = bits[row.dtype]
    row.view(itype)[j] = value
    assert math.isnan(float(row[j]))


# Each row's max is found while the row before it is computed, except for the first row of a
# thread's block and a row after an ignored one; rows of NaN (either sign), +inf, only -inf and
# a max of ±0 next to ordinary rows, ignored rows between them, against torch.
@pytest.mark.parametrize("v", [5, 1031, 40000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_rows_next_to_special_rows_match_torch(dtype: torch.dtype, v: int) -> None:
    x = make_logits((40, v), dtype, seed=v)
    x[3, v // 2] = math.nan
    _negative_nan(x[4], v - 1)
    x[7, 0] = math.inf
    x[8, :] = -math.inf
    x[11, :] = -x[11, :].abs()
    x[11, v // 3] = -0.0
    x[12, :] = -x[12, :].abs()
    x[12, 0] = 0.0
    x[13, :] = x[13, :] * 1000
    x[25, v // 2] = math.nan
    x[26, :] = -math.inf
    t = make_targets((40,), v, seed=v + 1)
    t[[2, 9, 10, 19, 20, 39]] = -100
    for fn in ("softmax", "log_softmax"):
        xs = [x.clone().requires_grad_() for _ in range(2)]
        ours = getattr(crossent, fn)(xs[0], -1, backend="cpu")
        theirs = getattr(F, fn)(xs[1].double(), -1).to(dtype)
        torch.testing.assert_close(ours, theirs, equal_nan=True)
    # cross entropy against the float64 oracle, with torch's own error in the input dtype
    for target in (t, torch.softmax(make_logits((40, v), torch.float64, seed=3), -1).to(dtype)):
        xs = [x.clone().requires_grad_() for _ in range(3)]
        ours = crossent.cross_entropy(xs[0], target, reduction="none", backend="cpu")
        theirs = F.cross_entropy(xs[1], target, reduction="none")
        exact_target = target if target.dtype == torch.int64 else target.double()
        oracle = F.cross_entropy(xs[2].double(), exact_target, reduction="none")
        assert_close_to_oracle(ours, oracle, theirs, what="loss")
        for out in (ours, theirs, oracle):
            out.sum().backward()
        assert_close_to_oracle(xs[0].grad, xs[2].grad, xs[1].grad, what="grad")


# The cross entropy down the columns of transposed logits (the linear cross entropy's
# transposed pass): against the float64 oracle of the rows, with the row kernel in the same
# dtype as the torch-like comparison. Shapes cover one class, group edges of the row walk (32
# rows), column counts that are not multiples of a cache line, and several bands per thread;
# columns hold NaN, +inf, only -inf, one -inf, and ignored targets; every option on.
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the oracle's -inf rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 6), (7, 3), (33, 17), (70, 40), (65, 2200)], ids=str)
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"label_smoothing": 0.2, "weight": True},
        {"label_smoothing": 0.1, "z_loss": 1e-3, "temperature": 1.5},
        {"softcap": 4.0, "weight": True, "z_loss": 1e-4},
        {"softcap": 6.0, "label_smoothing": 0.3, "temperature": 0.7},
    ],
    ids=["plain", "smooth-weight", "smooth-z-temp", "cap-weight-z", "cap-smooth-temp"],
)
def test_cross_entropy_columns_matches_oracle(
    dtype: torch.dtype, shape: tuple[int, int], kw: dict[str, object]
) -> None:
    from crossent import reference
    from crossent.backends.base import RowOptions
    from crossent.backends.cpu import CpuBackend

    v, n = shape
    kw = dict(kw)
    weighted = kw.pop("weight", False)
    weight = make_logits((v,), torch.float64, seed=5).abs().add(0.5) if weighted else None
    opts = RowOptions(ignore_index=-100, **kw)  # type: ignore[arg-type]
    x = make_logits((n, v), torch.float64, scale=4.0, seed=v + n)
    t = make_targets((n,), v, seed=n)
    t[1::5] = -100
    if v > 1:
        x[0, 1] = float("nan")
        x[2 % n, 0] = float("inf")
        x[3 % n, :] = float("-inf")
        x[4 % n, v - 1] = float("-inf")
    scale = torch.linspace(0.5, 2.0, n, dtype=dtype)  # one gradient scale per row
    w = None if weight is None else weight.to(dtype)
    rows = x.to(dtype)
    grad_rows = torch.empty_like(rows)
    stats = CpuBackend().cross_entropy_forward(rows, t, w, opts, grad_rows, scale)
    xt = rows.t().clone(memory_format=torch.contiguous_format)  # never a view of rows
    loss = CpuBackend().cross_entropy_columns(xt, t, w, opts, scale, 4)
    ext = {k: getattr(opts, k) for k in ("label_smoothing", "z_loss", "softcap", "temperature")}
    xo = rows.to(torch.float64)
    wo = None if w is None else w.to(torch.float64)
    oracle = reference.cross_entropy(xo, t, wo, reduction="none", **ext)
    grad = reference.cross_entropy_grad(
        xo, t, scale.to(torch.float64).numpy(), wo, reduction="none", **ext
    ).input
    assert_close_to_oracle(loss, oracle, stats.loss, dtype, what="loss")
    assert_close_to_oracle(xt.t(), grad, grad_rows, dtype, what="grad")
