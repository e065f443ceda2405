"""crossent.softmax / log_softmax against the float64 oracle, values and gradients, per backend.

Each case runs the same call through crossent and ``torch.nn.functional`` (same input, dtype
and incoming gradient), evaluates :mod:`crossent.reference` in float64 on that input, and
applies the one tolerance rule (:func:`crossent.testing.assert_close_to_oracle`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crossent
from crossent import dispatch, reference
from crossent.testing import assert_close_to_oracle, make_logits

# All four floating dtypes torch supports on CPU, forward and backward.
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# name -> (crossent function, torch function, oracle value, oracle gradient)
OPS = {
    "softmax": (crossent.softmax, F.softmax, reference.softmax, reference.softmax_grad),
    "log_softmax": (
        crossent.log_softmax, F.log_softmax, reference.log_softmax, reference.log_softmax_grad,
    ),
}


pytestmark = pytest.mark.usefixtures("one_thread")


# The triton backend computes softmax and log_softmax with the torch backend's operations,
# which these tests already cover.
@pytest.fixture(params=[b for b in dispatch.available() if b != "triton"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def run(fn: Any, x: torch.Tensor, dim: int, **kw: Any) -> tuple[torch.Tensor, Any, Any]:
    """Forward and backward with a non-uniform signed incoming gradient (uniform ones would
    give softmax a zero gradient). Returns (output, incoming gradient, input gradient)."""
    xi = x.detach().requires_grad_(x.dtype.is_floating_point)
    out = fn(xi, dim, **kw)
    g = make_logits(tuple(out.shape), out.dtype, seed=5, scale=1.0)
    if xi.requires_grad:
        out.backward(g)
    return out.detach(), g, xi.grad


def check(
    backend: str, op: str, x: torch.Tensor, dim: int, torch_x: torch.Tensor | None = None,
    **kw: Any,
) -> tuple[torch.Tensor, Any]:
    """Compare crossent's output and input gradient with the oracle, torch as the yardstick."""
    ours_fn, torch_fn, ref_fn, ref_grad = OPS[op]
    out, g, dx = run(lambda *a, **k: ours_fn(*a, **k, backend=backend), x, dim, **kw)
    t_out, _, t_dx = run(torch_fn, x if torch_x is None else torch_x, dim, **kw)
    assert out.dtype == t_out.dtype and out.shape == t_out.shape
    # torch casts to dtype= before the op: the oracle sees the cast values
    xc = x.to(kw["dtype"]) if kw.get("dtype") is not None else x
    assert_close_to_oracle(out, ref_fn(_np(xc), dim), t_out, what="output")
    if dx is not None:
        assert dx.dtype == x.dtype and dx.shape == x.shape
        # The gradient is computed in the cast dtype, then cast back to the input's dtype: after
        # a down-cast (float64 -> float32) it carries float32 rounding, so the float32 floor.
        floor = max(x.dtype, xc.dtype, key=lambda d: torch.finfo(d).eps)
        assert_close_to_oracle(dx, ref_grad(_np(xc), dim, _np(g)), t_dx, floor, what="d input")
    return out, dx


# Every dim of 1-, 2-, 3- and 4-D inputs, positive and negative: the last dim (the fast path),
# non-last dims (moved to the end and back), and dims of size 1. Sizes are small and distinct so
# a wrong axis cannot pass by symmetry.
SHAPE_DIMS = [
    ((7,), 0), ((7,), -1),
    ((4, 7), 0), ((4, 7), 1), ((4, 7), -1), ((4, 7), -2),
    ((2, 3, 5), 0), ((2, 3, 5), 1), ((2, 3, 5), 2), ((2, 3, 5), -1), ((2, 3, 5), -2),
    ((2, 3, 5), -3),
    ((2, 3, 4, 5), 0), ((2, 3, 4, 5), 1), ((2, 3, 4, 5), 2), ((2, 3, 4, 5), 3),
    ((2, 3, 4, 5), -1), ((2, 3, 4, 5), -4),
    ((3, 1, 4), 1), ((1, 6), 0),
]  # fmt: skip


# Each (shape, dim) in every dtype for both ops.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim", SHAPE_DIMS, ids=str)
@pytest.mark.parametrize("op", list(OPS))
def test_dims(backend, dtype, shape, dim, op):
    check(backend, op, make_logits(shape, dtype, seed=1), dim)


# 0-d input (dim 0 or -1: softmax 1, log_softmax 0), and empty inputs along and across the dim.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,dim", [((), 0), ((), -1), ((0, 7), 1), ((0, 7), 0), ((3, 0), 1), ((3, 0), 0),
                  ((2, 0, 3), -1)], ids=str,
)  # fmt: skip
@pytest.mark.parametrize("op", list(OPS))
def test_zero_dim_and_empty(backend, dtype, shape, dim, op):
    out, dx = check(backend, op, make_logits(shape, dtype, seed=2), dim)
    if shape == ():
        assert out.item() == (1.0 if op == "softmax" else 0.0)
        assert dx is not None and dx.item() == 0.0


# dtype=: up-casts (half/bfloat16 -> float32, float32 -> float64), a down-cast (float64 ->
# float32), and an integer input, which only works through dtype= (no gradient then).
CASTS = [
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float32, torch.float64),
    (torch.float64, torch.float32),
    (torch.int64, torch.float32),
]


# Each cast along the last dim and along a non-last dim, for both ops.
@pytest.mark.parametrize("src,dst", CASTS, ids=str)
@pytest.mark.parametrize("dim", [1, 0])  # last dim and a non-last dim
@pytest.mark.parametrize("op", list(OPS))
def test_dtype_argument(backend, src, dst, dim, op):
    x = make_logits((4, 6), torch.float64, seed=3).round() if src == torch.int64 else None
    x = make_logits((4, 6), src, seed=3) if x is None else x.to(src)
    out, _ = check(backend, op, x, dim, dtype=dst)
    assert out.dtype == dst


# Rows with: all -inf (NaN row), a +inf entry (NaN row: inf - inf), a partial -inf (p = 0 there,
# log p = -inf), ±1e4 spreads (exp underflows but at the max), and a NaN entry (NaN row).
# Regression, found by test_fuzz.py: half-precision log_softmax backward along a non-last dim.
# bfloat16 (4, 3, 1, 5) along dim 1: torch's half last-dim kernel on the moved tensor was 8.7e-3
# off the oracle where torch's own (non-last-dim) result is 4.5e-3 off and 7.7e-3 is allowed;
# computing in float32 and rounding once is within 3.3e-3.
def test_log_softmax_half_non_last_dim_grad(backend):
    x = make_logits((4, 3, 1, 5), torch.bfloat16, seed=38513, scale=0.1)
    g = make_logits((4, 3, 1, 5), torch.bfloat16, seed=38514, scale=1.0)
    grads = []
    for fn in (crossent.log_softmax, F.log_softmax):
        xi = x.detach().requires_grad_()
        kw = {"backend": backend} if fn is crossent.log_softmax else {}
        fn(xi, 1, **kw).backward(g)
        grads.append(xi.grad)
    oracle = reference.log_softmax_grad(_np(x), 1, _np(g))
    assert_close_to_oracle(grads[0], oracle, grads[1], what="d input")


def _extreme(kind: str, dtype: torch.dtype) -> torch.Tensor:
    x = make_logits((5, 6), torch.float64, seed=4)
    if kind == "all -inf":
        x[1] = -math.inf
    elif kind == "+inf":
        x[2, 3] = math.inf
    elif kind == "partial -inf":
        x[0, 0] = x[3, 2] = x[3, 5] = -math.inf
    elif kind == "±1e4":
        x = x * 1e4 / 3
    elif kind == "nan":
        x[4, 1] = math.nan
    return x.to(dtype)


# Every kind in every dtype, for both ops.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["all -inf", "+inf", "partial -inf", "±1e4", "nan"])
@pytest.mark.parametrize("dim", [1, 0])  # along the special row, and across it
@pytest.mark.parametrize("op", list(OPS))
def test_extreme_values(backend, dtype, kind, dim, op):
    out, _ = check(backend, op, _extreme(kind, dtype), dim)
    if kind == "all -inf" and dim == 1:
        assert bool(out[1].isnan().all())
    if kind == "+inf" and dim == 1:
        assert bool(out[2].isnan().all())


def _noncontig(kind: str, dtype: torch.dtype) -> torch.Tensor:
    if kind == "transposed":
        x = make_logits((7, 5), dtype, seed=6).t()
    elif kind == "col-stride":
        x = make_logits((5, 14), dtype, seed=6)[:, ::2]
    elif kind == "row-stride":
        x = make_logits((10, 7), dtype, seed=6)[::2]
    else:  # channels_last
        x = make_logits((2, 7, 3, 4), dtype, seed=6).to(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    return x


# A transposed matrix, strides along each dim, and channels_last 4-D: each layout reduced along
# dims of different strides.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["transposed", "col-stride", "row-stride", "channels_last"])
@pytest.mark.parametrize("dim", [1, -1, 0])  # the class dim, the last dim and the first
@pytest.mark.parametrize("op", list(OPS))
def test_non_contiguous(backend, dtype, layout, dim, op):
    check(backend, op, _noncontig(layout, dtype), dim)


# V below, at and past a power-of-two block (256, 1024), ImageNet's 1000, LLaMA's 32000.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [255, 256, 257, 1000, 1023, 1024, 1025, 32000])
@pytest.mark.parametrize("op", list(OPS))
def test_class_counts(backend, dtype, V, op):
    check(backend, op, make_logits((3, V), dtype, seed=7), -1)


def test_implicit_dim_warns_and_matches_torch(backend):
    # dim=None: dim 0 for 0-, 1- and 3-D input, else 1, with torch's deprecation warning
    for shape in [(5,), (3, 5), (2, 3, 5), (2, 3, 4, 5)]:
        x = make_logits(shape, torch.float32, seed=8)
        with pytest.warns(UserWarning, match="Implicit dimension choice for softmax"):
            out = crossent.softmax(x, backend=backend)
        with pytest.warns(UserWarning):
            expected = F.softmax(x)
        dim = 0 if len(shape) in (1, 3) else 1
        assert_close_to_oracle(out, reference.softmax(_np(x), dim), expected)


# --------------------------------------------------------------------------------------------
# autograd behaviour


# float64 and bfloat16, along the last dim and a non-last one: twice the gradient, as torch.
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("dim", [1, 0])
@pytest.mark.parametrize("op", list(OPS))
def test_retain_graph_second_backward(backend, dtype, dim, op):
    x = make_logits((4, 6), dtype, seed=9)
    ours_fn, torch_fn, _, ref_grad = OPS[op]
    grads = []
    for fn in (lambda *a: ours_fn(*a, backend=backend), torch_fn):
        xi = x.detach().clone().requires_grad_()
        out = fn(xi, dim)
        g = make_logits(tuple(out.shape), dtype, seed=10, scale=1.0)
        out.backward(g, retain_graph=True)
        first = xi.grad.clone()
        out.backward(g)
        assert torch.equal(xi.grad, 2 * first)
        grads.append(xi.grad)
    oracle = ref_grad(_np(x), dim, 2 * _np(g))
    assert_close_to_oracle(grads[0], oracle, grads[1], what="accumulated d input")


# float64 gradcheck along the last dim, the first dim, and a middle dim given negatively.
@pytest.mark.parametrize("shape,dim", [((3, 5), 1), ((3, 5), 0), ((2, 3, 4), -2)], ids=str)
@pytest.mark.parametrize("op", list(OPS))
def test_gradcheck(backend, shape, dim, op):
    x = make_logits(shape, torch.float64, seed=11, requires_grad=True)
    fn = OPS[op][0]
    assert torch.autograd.gradcheck(lambda x: fn(x, dim, backend=backend), (x,))


# Every dtype, along the last and a non-last dim: the input is never written.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, 0])
@pytest.mark.parametrize("op", list(OPS))
def test_input_not_modified(backend, dtype, dim, op):
    x = make_logits((4, 6), dtype, seed=12, requires_grad=True)
    before = x.detach().clone()
    out = OPS[op][0](x, dim, backend=backend)
    out.backward(make_logits(tuple(out.shape), dtype, seed=13, scale=1.0))
    assert torch.equal(x.detach(), before)


# Inference: no graph, and the same numbers as with autograd on.
@pytest.mark.parametrize("dim", [1, 0])
@pytest.mark.parametrize("op", list(OPS))
def test_no_grad(backend, dim, op):
    x = make_logits((4, 6), torch.float32, seed=14, requires_grad=True)
    ours_fn, torch_fn, ref_fn, _ = OPS[op]
    with torch.no_grad():
        out = ours_fn(x, dim, backend=backend)
        expected = torch_fn(x, dim)
    assert out.grad_fn is None and not out.requires_grad
    assert_close_to_oracle(out, ref_fn(_np(x), dim), expected)
