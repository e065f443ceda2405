"""Validate the float64 oracle `crossent.reference` against torch 2.13 in float64.

Torch is the ground truth here: every value and every gradient of the oracle is compared with
torch autograd at float64 tightness, including NaN and inf positions.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crossent import reference

# The oracle must silence its own intentional 0/0 and 0·inf (np.errstate): any numpy
# RuntimeWarning escaping from it fails the test.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


def check(ref, expected: torch.Tensor, what: str = "") -> None:
    """ref (oracle) must be a float64 ndarray equal to torch's float64 result, NaN/inf included."""
    assert isinstance(ref, np.ndarray), type(ref)
    assert ref.dtype == np.float64
    torch.testing.assert_close(
        torch.from_numpy(np.array(ref, order="C")),  # (np.ascontiguousarray makes 0-d 1-d)
        expected.detach(),
        rtol=1e-10,
        atol=1e-12,
        equal_nan=True,  # isclose also demands inf at exactly the same places, with its sign
        msg=lambda m: f"{what}\n{m}",
    )


# ------------------------------------------------------------------------------------------
# grids
# ------------------------------------------------------------------------------------------

# "C": unbatched (C,) input with a 0-d target; "0C": N = 0 (empty batch: mean NaN, sum 0);
# "1C", "5C": plain batches; "2C4": 3-D input (torch views it as 4-D for nll_loss2d);
# "2C22": 4-D input (torch's nll_loss2d directly).
SHAPES = ["C", "0C", "1C", "5C", "2C4", "2C22"]
# C = 1: a single class (loss 0 without smoothing); 3: small; 7: odd, not a power of two.
CLASSES = [1, 3, 7]
# None: w = 1; "random": positive non-uniform weights; "zero": w[0] = 0 (0·(-inf), zero total).
WEIGHTS = [None, "random", "zero"]
# "none": default ii=-100, nothing ignored; "class1": ii=1 is a real class (>= C when C = 1);
# "some": a negative ii other than -100 on about half the targets; "all": ii = C (>= C) on
# every target, so 'mean' is 0/0 = NaN with an all-zero gradient.
IGNORES = ["none", "class1", "some", "all"]
# Looped inside the big grids (same inputs, three reductions) to keep the test count down.
REDUCTIONS = ["none", "mean", "sum"]
# 0: plain NLL path; 0.3: typical smoothing; 1.0: the allowed maximum (pure smoothing term).
SMOOTHINGS = [0.0, 0.3, 1.0]


def input_shape(kind: str, n_classes: int) -> tuple[int, ...]:
    c = n_classes
    return {
        "C": (c,),
        "0C": (0, c),
        "1C": (1, c),
        "5C": (5, c),
        "2C4": (2, c, 4),
        "2C22": (2, c, 2, 2),
    }[kind]


def target_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return () if len(shape) == 1 else shape[:1] + shape[2:]


def make_target(rng, shape, n_classes, ignore) -> tuple[np.ndarray, int]:
    y = np.asarray(rng.integers(0, n_classes, size=target_shape(shape)), dtype=np.int64)
    if ignore == "none":
        return y, -100
    if ignore == "class1":
        return y, 1
    if ignore == "some":
        return np.where(rng.random(y.shape) < 0.5, -3, y).astype(np.int64), -3
    assert ignore == "all"
    return np.full_like(y, n_classes), n_classes


def make_weight(rng, n_classes, kind):
    if kind is None:
        return None
    w = rng.uniform(0.5, 2.0, n_classes)
    if kind == "zero":
        w[0] = 0.0
    return w


def make_grad_output(rng, loss: torch.Tensor) -> np.ndarray:
    # 'none': a non-uniform grad_output per element; 'mean'/'sum': a random scalar.
    return np.asarray(rng.standard_normal(loss.shape), dtype=np.float64)


def t(a, requires_grad=False):
    return None if a is None else torch.tensor(a, requires_grad=requires_grad)


# ------------------------------------------------------------------------------------------
# softmax / log_softmax
# ------------------------------------------------------------------------------------------

# (): 0-d input (softmax 1, log_softmax 0); (0,), (3, 0), (0, 3): empty along / across dim;
# (4,), (2, 3), (2, 3, 4): ordinary inputs. Every dim is tried, negative dims included.
SOFTMAX_CASES = [
    (shape, dim)
    for shape in [(), (0,), (3, 0), (0, 3), (4,), (2, 3), (2, 3, 4)]
    for dim in range(-max(len(shape), 1), max(len(shape), 1))
]


@pytest.mark.parametrize("shape,dim", SOFTMAX_CASES)
@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_softmax_every_dim(op, shape, dim):
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal(shape) * 3
    g_np = rng.standard_normal(shape)
    x = t(x_np, requires_grad=True)
    out = getattr(F, op)(x, dim=dim)
    out.backward(torch.from_numpy(g_np))
    check(getattr(reference, op)(x_np, dim), out)
    check(getattr(reference, op + "_grad")(x_np, dim, g_np), x.grad)


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_softmax_special_values(op):
    inf = math.inf
    x_np = np.array(
        [
            [1e4, -1e4, 0.5, 1e4],  # ±1e4: the max-subtracted form must not overflow
            [-inf, -inf, -inf, -inf],  # all -inf: NaN row
            [inf, 0.0, 1.0, -inf],  # a +inf entry: NaN row
            [-inf, 2.0, -inf, 1.0],  # partial -inf: p = 0, log p = -inf there
            [math.nan, 0.0, 1.0, 2.0],  # NaN spreads over the row
            [1e30, -1e30, 1e30, 0.0],  # extreme but finite
        ]
    )
    g_np = np.random.default_rng(1).standard_normal(x_np.shape)
    for dim in (1, -1, 0):  # across rows too: then the special values mix between columns
        x = t(x_np, requires_grad=True)
        out = getattr(F, op)(x, dim=dim)
        out.backward(torch.from_numpy(g_np))
        check(getattr(reference, op)(x_np, dim), out)
        check(getattr(reference, op + "_grad")(x_np, dim, g_np), x.grad)
    out = getattr(reference, op)(x_np, 1)
    assert np.isfinite(out[0]).all() and np.isfinite(out[5]).all()
    assert np.isnan(out[1]).all() and np.isnan(out[2]).all() and np.isnan(out[4]).all()
    assert out[3, 0] == out[3, 2] == (0.0 if op == "softmax" else -math.inf)


def test_softmax_zero_d_values():
    assert reference.softmax(np.float64(3.0), 0) == 1.0
    assert reference.log_softmax(np.float64(3.0), -1) == 0.0
    assert reference.softmax(np.float64(3.0), 0).shape == ()


# ------------------------------------------------------------------------------------------
# nll_loss
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ignore", IGNORES)
@pytest.mark.parametrize("weight_kind", WEIGHTS)
@pytest.mark.parametrize("n_classes", CLASSES)
@pytest.mark.parametrize("shape_kind", SHAPES)
def test_nll_loss(shape_kind, n_classes, weight_kind, ignore):
    rng = np.random.default_rng(2)
    shape = input_shape(shape_kind, n_classes)
    x_np = rng.standard_normal(shape) * 2  # need not be log-probabilities (positives too)
    y_np, ii = make_target(rng, shape, n_classes, ignore)
    w_np = make_weight(rng, n_classes, weight_kind)

    for reduction in REDUCTIONS:
        x = t(x_np, requires_grad=True)
        loss = F.nll_loss(
            x, torch.from_numpy(y_np), weight=t(w_np), ignore_index=ii, reduction=reduction
        )
        g_np = make_grad_output(rng, loss)
        loss.backward(torch.from_numpy(g_np))

        check(reference.nll_loss(x_np, y_np, w_np, ii, reduction), loss, reduction)
        check(reference.nll_loss_grad(x_np, y_np, g_np, w_np, ii, reduction), x.grad, reduction)


# ------------------------------------------------------------------------------------------
# cross_entropy, class indices
# ------------------------------------------------------------------------------------------


def run_ce_index(x_np, y_np, w_np, ii, reduction, ls, rng):
    """torch cross_entropy + backward on class indices; also runs the oracle and compares."""
    x = t(x_np, requires_grad=True)
    loss = F.cross_entropy(
        x,
        torch.from_numpy(y_np),
        weight=t(w_np),
        ignore_index=ii,
        reduction=reduction,
        label_smoothing=ls,
    )
    g_np = make_grad_output(rng, loss)
    loss.backward(torch.from_numpy(g_np))

    ref = reference.cross_entropy(x_np, y_np, w_np, ii, reduction, ls)
    grads = reference.cross_entropy_grad(x_np, y_np, g_np, w_np, ii, reduction, ls)
    check(ref, loss, f"loss, {reduction=}")
    check(grads.input, x.grad, f"grad input, {reduction=}")
    assert grads.target is None and grads.weight is None  # class-index path: input grad only
    return ref, grads.input


@pytest.mark.parametrize("ls", SMOOTHINGS)
@pytest.mark.parametrize("ignore", IGNORES)
@pytest.mark.parametrize("weight_kind", WEIGHTS)
@pytest.mark.parametrize("n_classes", CLASSES)
@pytest.mark.parametrize("shape_kind", SHAPES)
def test_cross_entropy_index(shape_kind, n_classes, weight_kind, ignore, ls):
    rng = np.random.default_rng(3)
    shape = input_shape(shape_kind, n_classes)
    x_np = rng.standard_normal(shape) * 2
    y_np, ii = make_target(rng, shape, n_classes, ignore)
    w_np = make_weight(rng, n_classes, weight_kind)
    for reduction in REDUCTIONS:
        run_ce_index(x_np, y_np, w_np, ii, reduction, ls, rng)


@pytest.mark.parametrize("ls", SMOOTHINGS)
@pytest.mark.parametrize("weight_kind", WEIGHTS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_large_logits(reduction, weight_kind, ls):
    # ±1e4 logits: exp would overflow without the max subtraction.
    rng = np.random.default_rng(4)
    x_np = rng.choice([-1e4, 1e4], size=(6, 5)) + rng.standard_normal((6, 5))
    y_np = rng.integers(0, 5, size=6)
    run_ce_index(x_np, y_np, make_weight(rng, 5, weight_kind), -100, reduction, ls, rng)


@pytest.mark.parametrize("ls", SMOOTHINGS)
@pytest.mark.parametrize("weight_kind", WEIGHTS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ii", [-100, 2])  # negative ii, and an in-range class as ii
def test_cross_entropy_neg_inf_in_ignored_rows(ii, reduction, weight_kind, ls):
    # Rows whose target is ignored hold -inf (on the zero-weight class 0 and on class ii
    # itself): torch masks, so their loss and gradient are exactly 0, never 0·inf = NaN.
    rng = np.random.default_rng(5)
    x_np = rng.standard_normal((6, 4))
    y_np = np.array([1, ii, 3, ii, 0, ii], dtype=np.int64)
    ignored = y_np == ii
    x_np[ignored, 0] = -math.inf
    x_np[ignored, 2] = -math.inf
    loss, grad = run_ce_index(x_np, y_np, make_weight(rng, 4, weight_kind), ii, reduction, ls, rng)
    assert np.isfinite(loss).all()
    if reduction == "none":
        assert (loss[ignored] == 0.0).all()
    assert (grad[ignored] == 0.0).all()
    assert np.isfinite(grad).all()


@pytest.mark.parametrize("ls", SMOOTHINGS)
@pytest.mark.parametrize("weight_kind", [None, "random"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_neg_inf_in_kept_rows(reduction, weight_kind, ls):
    # -inf on non-target classes: p = 0 there; the loss is finite without smoothing and +inf
    # with it (the smoothing sum sees the -inf). Row 3 has its target on a -inf logit: loss
    # +inf, but a finite gradient p - onehot; with ε = 1 torch's (1 - ε)·NLL is 0·inf = NaN.
    rng = np.random.default_rng(6)
    x_np = rng.standard_normal((4, 5))
    y_np = np.array([0, 1, 2, 3], dtype=np.int64)
    x_np[0, 2] = x_np[1, 4] = x_np[2, 0] = x_np[3, 3] = -math.inf
    loss, grad = run_ce_index(
        x_np, y_np, make_weight(rng, 5, weight_kind), -100, reduction, ls, rng
    )
    assert np.isfinite(grad[:3]).all()
    if reduction == "none":
        assert np.isnan(loss[3]) if ls == 1.0 else np.isposinf(loss[3])
        assert np.isfinite(loss[:3]).all() == (ls == 0.0)


@pytest.mark.parametrize("ls", SMOOTHINGS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_all_ignored(reduction, ls):
    # All targets ignored: 'mean' is NaN (0/0), 'sum' 0, 'none' zeros; the gradient is
    # exactly zero, even for 'mean'.
    rng = np.random.default_rng(7)
    x_np = rng.standard_normal((3, 4))
    y_np = np.full(3, -100, dtype=np.int64)
    loss, grad = run_ce_index(x_np, y_np, rng.uniform(0.5, 2, 4), -100, reduction, ls, rng)
    expected = {"mean": np.nan, "sum": 0.0, "none": np.zeros(3)}[reduction]
    np.testing.assert_array_equal(loss, expected)
    assert (grad == 0.0).all()
    assert not np.signbit(reference.nll_loss_grad(x_np, y_np, 1.0)).any()  # +0, not -0


@pytest.mark.parametrize("ls", SMOOTHINGS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_zero_total_weight(reduction, ls):
    # Every non-ignored target is on the zero-weight class: 'mean' is 0/0 or x/0 and the
    # gradient NaN (contrast all-ignored). A second case has weights 1 and -1 cancelling.
    rng = np.random.default_rng(8)
    x_np = rng.standard_normal((4, 3))
    y_np = np.array([0, -100, 0, 0], dtype=np.int64)
    w_np = np.array([0.0, 1.0, 2.0])
    loss, grad = run_ce_index(x_np, y_np, w_np, -100, reduction, ls, rng)
    if reduction == "mean":
        assert np.isnan(loss) and np.isnan(grad[[0, 2, 3]]).all()
    run_ce_index(x_np, np.array([0, 1, 2, 2]), np.array([1.0, -1.0, 0.0]), -100, reduction, ls, rng)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_empty_batch(reduction):
    rng = np.random.default_rng(9)
    loss, grad = run_ce_index(
        np.zeros((0, 4)), np.zeros(0, np.int64), None, -100, reduction, 0.3, rng
    )
    expected = {"mean": np.nan, "sum": 0.0, "none": np.zeros(0)}[reduction]
    np.testing.assert_array_equal(loss, expected)
    assert grad.shape == (0, 4)


@pytest.mark.parametrize("ls", [-0.5, math.nan])
def test_cross_entropy_nonpositive_or_nan_smoothing_is_off(ls):
    rng = np.random.default_rng(10)
    x_np = rng.standard_normal((5, 4))
    y_np = rng.integers(0, 4, size=5)
    loss, _ = run_ce_index(x_np, y_np, None, -100, "mean", ls, rng)
    np.testing.assert_array_equal(loss, reference.cross_entropy(x_np, y_np))


@pytest.mark.parametrize("ls", SMOOTHINGS)
def test_cross_entropy_1d_input_with_size_1_target(ls):
    # torch accepts (C,) logits with a (1,) target in forward (0-d loss) when ls = 0; its
    # backward then fails (TORCH_SEMANTICS §8), so the gradient is checked against the 0-d target.
    rng = np.random.default_rng(11)
    x_np = rng.standard_normal(4)
    if ls == 0.0:
        check(
            reference.cross_entropy(x_np, np.array([2]), reduction="none"),
            F.cross_entropy(t(x_np), torch.tensor([2]), reduction="none"),
        )
    _, grad = run_ce_index(x_np, np.array(2), None, -100, "sum", ls, rng)
    np.testing.assert_array_equal(
        reference.cross_entropy_grad(
            x_np, np.array([2]), 1.0, reduction="sum", label_smoothing=ls
        ).input,
        reference.cross_entropy_grad(
            x_np, np.array(2), 1.0, reduction="sum", label_smoothing=ls
        ).input,
    )
    assert grad.shape == (4,)


# ------------------------------------------------------------------------------------------
# cross_entropy, probability targets
# ------------------------------------------------------------------------------------------


def run_ce_prob(x_np, p_np, w_np, reduction, ls, rng):
    """torch cross_entropy with probability targets; input, target and weight all need grad."""
    x, p, w = t(x_np, True), t(p_np, True), t(w_np, True)
    loss = F.cross_entropy(x, p, weight=w, reduction=reduction, label_smoothing=ls)
    g_np = make_grad_output(rng, loss)
    loss.backward(torch.from_numpy(g_np))

    ref = reference.cross_entropy(x_np, p_np, w_np, -100, reduction, ls)
    grads = reference.cross_entropy_grad(x_np, p_np, g_np, w_np, -100, reduction, ls)
    check(ref, loss, f"loss, {reduction=}")
    check(grads.input, x.grad, f"grad input, {reduction=}")
    check(grads.target, p.grad, f"grad target, {reduction=}")
    if w_np is None:
        assert grads.weight is None
    else:
        check(grads.weight, w.grad, f"grad weight, {reduction=}")
    return ref, grads


@pytest.mark.parametrize("ls", SMOOTHINGS)
@pytest.mark.parametrize("weight_kind", WEIGHTS)
@pytest.mark.parametrize("n_classes", CLASSES)
@pytest.mark.parametrize("shape_kind", SHAPES)
def test_cross_entropy_prob(shape_kind, n_classes, weight_kind, ls):
    rng = np.random.default_rng(12)
    shape = input_shape(shape_kind, n_classes)
    x_np = rng.standard_normal(shape) * 2
    # Not normalised and partly negative: torch validates nothing; 'mean' still divides by
    # numel / C, never by the weights.
    p_np = rng.uniform(-0.25, 1.0, shape)
    w_np = make_weight(rng, n_classes, weight_kind)
    for reduction in REDUCTIONS:
        run_ce_prob(x_np, p_np, w_np, reduction, ls, rng)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_prob_special(reduction):
    # Row 0: ±1e4 logits. Row 1: a zero probability on a -inf logit (torch: 0·(-inf) = NaN).
    # Row 2: a positive probability on a -inf logit (+inf loss). Empty input: 'mean' is NaN.
    rng = np.random.default_rng(13)
    x_np = np.array([[1e4, -1e4, 0.0], [0.0, -math.inf, 1.0], [-math.inf, 0.0, 1.0]])
    p_np = np.array([[0.2, 0.5, 0.3], [0.5, 0.0, 0.5], [0.1, 0.6, 0.3]])
    loss, _ = run_ce_prob(x_np, p_np, np.array([1.0, 2.0, 0.5]), reduction, 0.0, rng)
    if reduction == "none":
        assert np.isfinite(loss[0]) and np.isnan(loss[1]) and np.isposinf(loss[2])
    loss, _ = run_ce_prob(np.zeros((0, 3)), np.zeros((0, 3)), None, reduction, 0.3, rng)
    expected = {"mean": np.nan, "sum": 0.0, "none": np.zeros(0)}[reduction]
    np.testing.assert_array_equal(loss, expected)


# ------------------------------------------------------------------------------------------
# the oracle stays independent
# ------------------------------------------------------------------------------------------


def test_reference_imports_only_numpy():
    tree = ast.parse(Path(reference.__file__).read_text())
    allowed = {"numpy", "__future__", "typing"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports in the oracle"
            names = [node.module]
        else:
            continue
        for name in names:
            assert name.split(".")[0] in allowed, f"reference.py imports {name}"
