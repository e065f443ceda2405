"""crossent.nll_loss against the float64 oracle, values and gradients, for every backend.

Each case runs the same call through crossent and ``torch.nn.functional.nll_loss`` (same
inputs, dtype and incoming gradient), evaluates :mod:`crossent.reference` in float64 on those
inputs, and applies the one tolerance rule (:func:`crossent.testing.assert_close_to_oracle`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from oracle_inputs import _np, class_dim, grad_output_for, target_shape

import crossent
from crossent import _autograd, dispatch, reference
from crossent.testing import assert_close_to_oracle, make_logits, make_targets, make_weight

# All four floating dtypes torch supports on CPU, forward and backward.
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
REDUCTIONS = ["none", "mean", "sum"]
C = 7  # odd and not a power of two


pytestmark = pytest.mark.usefixtures("one_thread")


# The triton backend computes nll_loss with the torch backend's operations, which these tests
# already cover.
@pytest.fixture(params=[b for b in dispatch.available() if b != "triton"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


# --------------------------------------------------------------------------------------------
# helpers


@dataclass
class Result:
    loss: torch.Tensor
    grad_out: torch.Tensor
    d_input: torch.Tensor


def run(fn: Any, x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
        kw: dict[str, Any]) -> Result:  # fmt: skip
    xi = x.detach().requires_grad_(True)  # detach() keeps the strides (non-contiguous stays)
    loss = fn(xi, target, weight, **kw)
    g = grad_output_for(loss, kw.get("reduction", "mean"))
    loss.backward(g)
    assert xi.grad is not None
    return Result(loss.detach(), g, xi.grad)


def check_nll(
    backend: str,
    x: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    torch_x: torch.Tensor | None = None,
    **kw: Any,
) -> Result:
    """Compare crossent's loss and gradient with the oracle, torch's error as the yardstick.

    ``torch_x`` replaces ``x`` for the torch run only (same values, another layout).
    """
    ours = run(lambda *a, **k: crossent.nll_loss(*a, **k, backend=backend), x, target, weight, kw)
    theirs = run(F.nll_loss, x if torch_x is None else torch_x, target, weight, kw)
    assert ours.loss.dtype == theirs.loss.dtype == x.dtype
    assert ours.loss.shape == theirs.loss.shape
    assert ours.d_input.dtype == x.dtype and ours.d_input.shape == x.shape
    okw = dict(
        weight=_np(weight),
        ignore_index=kw.get("ignore_index", -100),
        reduction=kw.get("reduction", "mean"),
    )
    xn, tn = _np(x), _np(target)
    assert_close_to_oracle(ours.loss, reference.nll_loss(xn, tn, **okw), theirs.loss,
                           what="loss")  # fmt: skip
    grad = reference.nll_loss_grad(xn, tn, _np(ours.grad_out), **okw)
    assert_close_to_oracle(ours.d_input, grad, theirs.d_input, what="d input")
    return ours


# --------------------------------------------------------------------------------------------
# grids


# (C,) unbatched with a 0-d target; (N, C); 3-D (torch views it as 4-D); 4-D (nll_loss2d);
# 5-D (the >= 5-D view path).
SHAPES = [(C,), (5, C), (3, C, 4), (2, C, 3, 2), (2, C, 2, 1, 3)]


# Raw logits (not log-probabilities, positive values included): nll_loss takes input as is.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_shapes(backend, dtype, shape, weighted, reduction):
    x = make_logits(shape, dtype, seed=1)
    t = make_targets(target_shape(shape), shape[class_dim(shape)], seed=1)
    w = make_weight(shape[class_dim(shape)], dtype) if weighted else None
    check_nll(backend, x, t, w, reduction=reduction)


# log_softmax output as input: the usual use, values all <= 0 with a wide range.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_log_probability_input(backend, dtype, reduction):
    x = torch.log_softmax(make_logits((6, C), torch.float64, seed=2), 1).to(dtype)
    check_nll(backend, x, make_targets((6,), C, seed=2), make_weight(C, dtype), reduction=reduction)


# ignore_index kinds: the default -100 unused and used; another negative value; a real class
# in [0, C) (that class is then ignored); a value >= C.
IGNORES = {
    "default-unused": (-100, 0.0),
    "default-some": (-100, 0.4),
    "negative": (-3, 0.4),
    "in-range": (2, 0.4),
    ">=C": (C + 5, 0.4),
}


# Each kind on the 2-D path and on the K-dim path (nll_loss2d), with and without weights; the
# ignored positions must get exactly 0 gradient.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ignore", list(IGNORES))
@pytest.mark.parametrize("shape", [(12, C), (3, C, 4)], ids=str)  # 2-D path and K-dim path
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ignore_index(backend, dtype, ignore, shape, weighted, reduction):
    ii, frac = IGNORES[ignore]
    x = make_logits(shape, dtype, seed=3)
    t = make_targets(target_shape(shape), C, seed=3, ignore_index=ii, ignore_fraction=frac)
    assert bool((t == ii).any()) == (frac > 0)
    w = make_weight(C, dtype) if weighted else None
    r = check_nll(backend, x, t, w, ignore_index=ii, reduction=reduction)
    ignored = (t == ii).unsqueeze(1).expand_as(x)
    assert bool((r.d_input[ignored] == 0).all())


# Regression: float32 reductions are summed in float64. The 12 terms -x[n, y_n] are exact
# float32 numbers of magnitude 0.5..5 whose sum cancels to 0.2711: the exact sum is 0.27109146
# (a float32), torch's cascade sum gives 0.27109134 (4 ulps off), a float32 sum in another
# order gave 0.27109241 (32 ulps off).
@pytest.mark.parametrize("reduction", ["sum"])
def test_float32_sum_no_worse_than_torch(backend, reduction):
    x = make_logits((12, C), torch.float32, seed=3)
    t = make_targets((12,), C, seed=3)
    check_nll(backend, x, t, reduction=reduction)


# Many rows: on CPU the 'mean' denominator and the sum of the rows are taken over chunks of
# _SUM_CHUNK rows; ignored rows and weights in every chunk, a partial last chunk.
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_many_rows_reduced_in_chunks(backend, weighted, reduction):
    m = 2 * _autograd._SUM_CHUNK + 5
    x = make_logits((m, C), torch.float32, seed=21)
    t = make_targets((m,), C, seed=21, ignore_index=-100, ignore_fraction=0.25)
    check_nll(backend, x, t, make_weight(C, torch.float32) if weighted else None,
              reduction=reduction)  # fmt: skip


# Every target ignored: 'mean' is 0/0 = NaN on purpose, 'sum' 0, 'none' zeros; the gradient is
# all zeros, not NaN (contrast zero total weight below).
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, C), (2, C, 3)], ids=str)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored(backend, dtype, shape, weighted, reduction):
    x = make_logits(shape, dtype, seed=4)
    t = torch.full(target_shape(shape), 5)
    w = make_weight(C, dtype) if weighted else None
    r = check_nll(backend, x, t, w, ignore_index=5, reduction=reduction)
    if reduction == "mean":
        assert bool(r.loss.isnan())
    else:
        assert bool((r.loss == 0).all())
    assert bool((r.d_input == 0).all())


# Weights of the kept targets summing to 0: 'mean' is 0/0 and the gradient is NaN (§4.2);
# and negative weights, which torch does not validate.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weights", ["zero-total", "negative"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_unusual_weights(backend, dtype, weights, reduction):
    x = make_logits((5, C), dtype, seed=5)
    t = torch.tensor([0, 2, 0, 2, 6])
    w = make_weight(C, dtype)
    if weights == "zero-total":
        w[[0, 2, 6]] = 0
    else:
        w[2] = -w[2]
    check_nll(backend, x, t, w, reduction=reduction)


# uint8 targets: accepted on the 1-D and 2-D paths only.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(C,), (6, C)], ids=str)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_uint8_targets(backend, dtype, shape, weighted, reduction):
    x = make_logits(shape, dtype, seed=6)
    t = make_targets(target_shape(shape), C, seed=6).to(torch.uint8)
    w = make_weight(C, dtype) if weighted else None
    check_nll(backend, x, t, w, reduction=reduction)


# N = 0 and an empty spatial dim ('mean' NaN, 'sum' 0, 'none' empty); C = 1 (every target 0).
EDGE_SHAPES = [(0, C), (0, C, 3), (2, C, 0), (3, 1), (1, 1), (1,), (2, 1, 3)]


# Each edge shape in every dtype, weighted or not, for every reduction.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=str)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_and_single_class(backend, dtype, shape, weighted, reduction):
    x = make_logits(shape, dtype, seed=7)
    t = make_targets(target_shape(shape), shape[class_dim(shape)], seed=7)
    w = make_weight(shape[class_dim(shape)], dtype) if weighted else None
    check_nll(backend, x, t, w, reduction=reduction)


def _noncontig(kind: str, dtype: torch.dtype) -> torch.Tensor:
    if kind == "transposed":  # (N, C) as the transpose of (C, N)
        x = make_logits((C, 6), dtype, seed=8).t()
    elif kind == "col-stride":  # stride 2 along C
        x = make_logits((6, 2 * C), dtype, seed=8)[:, ::2]
    elif kind == "row-stride":  # every other row
        x = make_logits((12, C), dtype, seed=8)[::2]
    elif kind == "channels_last":  # NHWC memory
        x = make_logits((2, C, 3, 4), dtype, seed=8).to(memory_format=torch.channels_last)
    else:  # "permuted-3d"
        x = make_logits((3, 5, C), dtype, seed=8).permute(0, 2, 1)
    assert not x.is_contiguous()
    return x


LAYOUTS = ["transposed", "col-stride", "row-stride", "channels_last", "permuted-3d"]


# torch itself fails in backward on a dense non-contiguous 4-D input ("grad_input must be
# contiguous", §8), so torch's yardstick run gets a contiguous copy of the same values.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_non_contiguous(backend, dtype, layout, weighted, reduction):
    x = _noncontig(layout, dtype)
    t = make_targets((2 * x.shape[0], *x.shape[2:]), C, seed=8, ignore_index=-100,
                     ignore_fraction=0.2)[::2]  # fmt: skip
    w = make_weight(C, dtype) if weighted else None
    check_nll(backend, x, t, w, torch_x=x.contiguous(), reduction=reduction)


def _extreme(kind: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    x = make_logits((6, C), torch.float64, seed=9)
    t = torch.tensor([0, 3, 6, -100, 2, 5])
    if kind == "±1e4":
        x = x * 1e4 / 3
    elif kind == "-inf-target":  # loss +inf, gradient finite
        x[1, 3] = -math.inf
    elif kind == "+inf-target":  # loss -inf
        x[2, 6] = math.inf
    elif kind == "inf-elsewhere":  # not picked: no effect
        x[0, 1], x[4, 0] = math.inf, -math.inf
    elif kind == "-inf-ignored":  # an ignored row of -inf: exactly 0 loss and gradient
        x[3] = -math.inf
    return x.to(dtype), t


# Rows 0..5 pick the target entry: ±1e4 magnitudes, ±inf at the picked entry (loss ∓inf),
# ±inf not picked (no effect), and an ignored row of -inf (row 3 is ignored in all of them).
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "kind", ["±1e4", "-inf-target", "+inf-target", "inf-elsewhere", "-inf-ignored"]
)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_extreme_inputs(backend, dtype, kind, weighted, reduction):
    x, t = _extreme(kind, dtype)
    w = make_weight(C, dtype) if weighted else None
    r = check_nll(backend, x, t, w, reduction=reduction)
    assert bool((r.d_input[3] == 0).all())
    if reduction == "none":
        assert r.loss[3] == 0


# A zero weight on a -inf target: 0·(-inf) = NaN in a kept row, as in torch.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_zero_weight_on_neg_inf(backend, dtype, reduction):
    x = make_logits((3, C), torch.float64, seed=10)
    x[1, 4] = -math.inf
    x = x.to(dtype)
    w = make_weight(C, dtype)
    w[4] = 0
    check_nll(backend, x, torch.tensor([0, 4, 1]), w, reduction=reduction)


# V below, at and past a power-of-two block (1024), ImageNet's 1000 and LLaMA's 32000; nll_loss
# reads one element per row, so even the reference backend is quick here.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1000, 1023, 1024, 1025, 32000])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_class_counts(backend, dtype, V, reduction):
    x = make_logits((5, V), dtype, seed=11)
    t = make_targets((5,), V, seed=11, ignore_index=-100, ignore_fraction=0.2)
    t[0] = V - 1  # the last class
    check_nll(backend, x, t, make_weight(V, dtype), reduction=reduction)


# --------------------------------------------------------------------------------------------
# autograd behaviour


def _inputs(dtype: torch.dtype = torch.float64):
    x = make_logits((6, C), dtype, seed=12)
    t = make_targets((6,), C, seed=12, ignore_index=3, ignore_fraction=0.3)
    return x, t, make_weight(C, dtype)


# float64 and bfloat16 (the gradient dtype of the half types); every reduction.
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_retain_graph_second_backward(backend, dtype, reduction):
    x, t, w = _inputs(dtype)
    results = []
    for fn in (lambda *a, **k: crossent.nll_loss(*a, **k, backend=backend), F.nll_loss):
        xi = x.detach().clone().requires_grad_()
        loss = fn(xi, t, w, ignore_index=3, reduction=reduction)
        g = grad_output_for(loss, reduction)
        loss.backward(g, retain_graph=True)
        first = xi.grad.clone()
        loss.backward(g)
        assert torch.equal(xi.grad, 2 * first)
        results.append((xi.grad, g))
    (ours, g), (theirs, _) = results
    oracle = reference.nll_loss_grad(_np(x), _np(t), 2 * _np(g), _np(w), 3, reduction)
    assert_close_to_oracle(ours, oracle, theirs, what="accumulated d input")


@pytest.mark.parametrize("shape", [(4, 5), (2, 5, 3)], ids=str)  # 2-D and K-dim paths
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(backend, shape, reduction):
    x = make_logits(shape, torch.float64, seed=13, requires_grad=True)
    t = make_targets(target_shape(shape), 5, seed=13, ignore_index=1, ignore_fraction=0.3)
    w = make_weight(5, torch.float64)

    def f(x):
        return crossent.nll_loss(x, t, w, ignore_index=1, reduction=reduction, backend=backend)

    assert torch.autograd.gradcheck(f, (x,))


# Every dtype and reduction: neither forward nor backward may write into its inputs.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_inputs_not_modified(backend, dtype, reduction):
    x, t, w = _inputs(dtype)
    x.requires_grad_()
    saved = [a.detach().clone() for a in (x, t, w)]
    loss = crossent.nll_loss(x, t, w, ignore_index=3, reduction=reduction, backend=backend)
    loss.backward(grad_output_for(loss, reduction))
    for before, after in zip(saved, (x, t, w), strict=True):
        assert torch.equal(before, after.detach())


# Inference: no graph, and the same numbers as with autograd on.
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_grad(backend, reduction):
    x, t, w = _inputs(torch.float32)
    x.requires_grad_()
    with torch.no_grad():
        loss = crossent.nll_loss(x, t, w, ignore_index=3, reduction=reduction, backend=backend)
        expected = F.nll_loss(x, t, w, ignore_index=3, reduction=reduction)
    assert loss.grad_fn is None and not loss.requires_grad
    oracle = reference.nll_loss(_np(x), _np(t), _np(w), 3, reduction)
    assert_close_to_oracle(loss, oracle, expected)
