"""crossent.cross_entropy against the float64 oracle, values and gradients, for every backend.

Every case runs the same call through crossent and through ``torch.nn.functional`` on the same
inputs (same dtype, same incoming gradient), evaluates the NumPy float64 oracle
(:mod:`crossent.reference`) on those inputs, and applies the one tolerance rule
(:func:`crossent.testing.assert_close_to_oracle`): crossent may be no further from the oracle
than torch is, plus a per-dtype floor. Shapes and dtypes must equal torch's.
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
from crossent.backends import torch as torch_backend
from crossent.testing import (
    assert_close_to_oracle,
    make_logits,
    make_probs,
    make_targets,
    make_weight,
)

# All four floating dtypes torch supports on CPU, forward and backward.
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
REDUCTIONS = ["none", "mean", "sum"]
C = 7  # odd and not a power of two, so no size lines up with anything by accident


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# helpers: the same call through crossent and torch, then the oracle


@dataclass
class Result:
    loss: torch.Tensor
    grad_out: torch.Tensor
    d_input: torch.Tensor | None
    d_target: torch.Tensor | None
    d_weight: torch.Tensor | None


def run(
    fn: Any,
    x: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    kw: dict[str, Any],
    target_grad: bool = False,
    weight_grad: bool = False,
    seed: int = 0,
) -> Result:
    # detach() keeps the strides, so non-contiguous inputs stay non-contiguous leaves
    xi = x.detach().requires_grad_(True)
    ti = target.detach().requires_grad_(True) if target_grad else target
    wi = None if weight is None else weight.detach().requires_grad_(weight_grad)
    loss = fn(xi, ti, wi, **kw)
    g = grad_output_for(loss, kw.get("reduction", "mean"), seed)
    loss.backward(g)
    return Result(
        loss.detach(),
        g,
        xi.grad,
        ti.grad if target_grad else None,
        wi.grad if weight_grad and wi is not None else None,
    )


def check_cross_entropy(
    backend: str,
    x: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    target_grad: bool = False,
    weight_grad: bool = False,
    torch_inputs: tuple[torch.Tensor, torch.Tensor] | None = None,
    seed: int = 0,
    **kw: Any,
) -> Result:
    """Compare crossent's loss and every gradient with the oracle, torch being the yardstick.

    ``torch_inputs`` replaces ``(x, target)`` for the torch run only (same values, other layout).
    """
    ours = run(
        lambda *a, **k: crossent.cross_entropy(*a, **k, backend=backend),
        x, target, weight, kw, target_grad, weight_grad, seed,
    )  # fmt: skip
    tx, tt = torch_inputs or (x, target)
    theirs = run(F.cross_entropy, tx, tt, weight, kw, target_grad, weight_grad, seed)

    assert ours.loss.dtype == theirs.loss.dtype
    assert ours.loss.shape == theirs.loss.shape
    okw = dict(
        weight=_np(weight),
        ignore_index=kw.get("ignore_index", -100),
        reduction=kw.get("reduction", "mean"),
        label_smoothing=kw.get("label_smoothing", 0.0),
    )
    xn, tn = _np(x), _np(target)
    assert_close_to_oracle(ours.loss, reference.cross_entropy(xn, tn, **okw), theirs.loss,
                           what="loss")  # fmt: skip
    grads = reference.cross_entropy_grad(xn, tn, _np(ours.grad_out), **okw)
    assert ours.d_input is not None and theirs.d_input is not None
    assert ours.d_input.dtype == theirs.d_input.dtype == x.dtype
    assert ours.d_input.shape == x.shape
    assert_close_to_oracle(ours.d_input, grads.input, theirs.d_input, what="d input")
    if target_grad:
        assert ours.d_target is not None and ours.d_target.dtype == target.dtype
        assert_close_to_oracle(ours.d_target, grads.target, theirs.d_target, what="d target")
    if weight_grad and weight is not None:
        assert ours.d_weight is not None and ours.d_weight.dtype == weight.dtype
        assert_close_to_oracle(ours.d_weight, grads.weight, theirs.d_weight, what="d weight")
    return ours


# --------------------------------------------------------------------------------------------
# class-index targets


# (C,) unbatched with a 0-d target; (N, C); 3-D (torch views it as 4-D for nll_loss2d);
# 4-D (nll_loss2d directly); 5-D (the >= 5-D view path).
SHAPES = [(C,), (5, C), (3, C, 4), (2, C, 3, 2), (2, C, 2, 1, 3)]
# (weighted, ε): plain NLL path, class weights alone, smoothing alone, both (#104776's branch).
OPTIONS = [(False, 0.0), (True, 0.0), (False, 0.3), (True, 0.3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("weighted,eps", OPTIONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_index_targets(backend, dtype, shape, weighted, eps, reduction):
    x = make_logits(shape, dtype, seed=1)
    t = make_targets(target_shape(shape), shape[class_dim(shape)], seed=1)
    w = make_weight(shape[class_dim(shape)], dtype) if weighted else None
    check_cross_entropy(backend, x, t, w, reduction=reduction, label_smoothing=eps)


# ignore_index kinds: the default -100 with nothing ignored and with some ignored; another
# negative value; a real class in [0, C) (that class is then ignored); a value >= C.
IGNORES = {
    "default-unused": (-100, 0.0),
    "default-some": (-100, 0.4),
    "negative": (-3, 0.4),
    "in-range": (2, 0.4),
    ">=C": (C + 5, 0.4),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ignore", list(IGNORES))
@pytest.mark.parametrize("weighted,eps", OPTIONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ignore_index(backend, dtype, ignore, weighted, eps, reduction):
    ii, frac = IGNORES[ignore]
    x = make_logits((12, C), dtype, seed=2)
    t = make_targets((12,), C, seed=2, ignore_index=ii, ignore_fraction=frac)
    assert (t == ii).any() == (frac > 0)  # the grid means what it says
    w = make_weight(C, dtype) if weighted else None
    r = check_cross_entropy(
        backend, x, t, w, ignore_index=ii, reduction=reduction, label_smoothing=eps
    )
    ignored = t == ii
    assert r.d_input is not None and bool((r.d_input[ignored] == 0).all())
    if reduction == "none":
        assert bool((r.loss[ignored] == 0).all())


# Every target ignored: 'mean' is 0/0 = NaN (intentional in torch), 'sum' 0, 'none' zeros; the
# gradient is exactly zero, never NaN. Both a K-dim and a 2-D input, with and without options.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, C), (2, C, 3)], ids=str)
@pytest.mark.parametrize("weighted,eps", OPTIONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored(backend, dtype, shape, weighted, eps, reduction):
    x = make_logits(shape, dtype, seed=3)
    t = torch.full(target_shape(shape), -100)
    w = make_weight(C, dtype) if weighted else None
    r = check_cross_entropy(backend, x, t, w, reduction=reduction, label_smoothing=eps)
    expected = {"none": 0.0, "sum": 0.0, "mean": math.nan}[reduction]
    assert torch.equal(r.loss.isnan(), torch.full_like(r.loss, expected).isnan())
    if reduction != "mean":
        assert bool((r.loss == 0).all())
    assert r.d_input is not None and bool((r.d_input == 0).all())


# ε <= 0 and NaN: silently no smoothing; 1e-3: barely on; 0.1: typical; 1.0: the allowed
# maximum (pure smoothing term, which with weights still depends on y through the denominator).
EPSILONS = [-0.5, 0.0, math.nan, 1e-3, 0.1, 1.0]
# Smoothing alone, with class weights, with ignore_index, and with both.
SMOOTH_WITH = ["alone", "weight", "ignore", "weight+ignore"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", EPSILONS, ids=str)
@pytest.mark.parametrize("with_", SMOOTH_WITH)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_label_smoothing(backend, dtype, eps, with_, reduction):
    x = make_logits((9, C), dtype, seed=4)
    ii = 4 if "ignore" in with_ else -100
    t = make_targets((9,), C, seed=4, ignore_index=ii, ignore_fraction=0.3)
    w = make_weight(C, dtype, seed=4) if "weight" in with_ else None
    check_cross_entropy(backend, x, t, w, ignore_index=ii, reduction=reduction,
                        label_smoothing=eps)  # fmt: skip


# uint8 class indices are accepted on the 1-D/2-D path (not K-dim). No weights with smoothing:
# torch itself fails there (gather needs int64), which §3 documents and we do not copy.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(C,), (6, C)], ids=str)
@pytest.mark.parametrize("weighted,eps", [(False, 0.0), (True, 0.0), (False, 0.3)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_uint8_targets(backend, dtype, shape, weighted, eps, reduction):
    x = make_logits(shape, dtype, seed=5)
    t = make_targets(target_shape(shape), C, seed=5).to(torch.uint8)
    w = make_weight(C, dtype) if weighted else None
    check_cross_entropy(backend, x, t, w, reduction=reduction, label_smoothing=eps)


# N = 0 ('mean' NaN, 'sum' 0, 'none' empty), a spatial dim of 0, and C = 1 (a single class:
# loss 0 and gradient 0, with or without smoothing). One row of one class too.
EDGE_SHAPES = [(0, C), (0, C, 3), (2, C, 0), (3, 1), (1, 1), (1,), (2, 1, 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=str)
@pytest.mark.parametrize("weighted,eps", OPTIONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_and_single_class(backend, dtype, shape, weighted, eps, reduction):
    x = make_logits(shape, dtype, seed=6)
    t = make_targets(target_shape(shape), shape[class_dim(shape)], seed=6)
    w = make_weight(shape[class_dim(shape)], dtype) if weighted else None
    check_cross_entropy(backend, x, t, w, reduction=reduction, label_smoothing=eps)


# --------------------------------------------------------------------------------------------
# probability targets


# (C,), (N, C) and 4-D: the three shape families of the probability path.
PROB_SHAPES = [(C,), (5, C), (2, C, 3, 2)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", PROB_SHAPES, ids=str)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.25])  # off, and t' = (1-ε)·t + ε/C
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_prob_targets(backend, dtype, shape, weighted, eps, reduction):
    # target and weight require grad: torch differentiates through both on this path (§6).
    x = make_logits(shape, dtype, seed=7)
    t = make_probs(shape, dtype, seed=7)
    w = make_weight(shape[class_dim(shape)], dtype) if weighted else None
    check_cross_entropy(backend, x, t, w, target_grad=True, weight_grad=True,
                        reduction=reduction, label_smoothing=eps)  # fmt: skip


# Targets that are not distributions (negative, not summing to 1: torch does not validate), a
# negative ignore_index other than -100 (silently unused), and N = 0 ('mean' NaN).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["unnormalised", "ignore_index=-1", "N=0"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_prob_targets_unusual(backend, dtype, case, reduction):
    shape = (0, C) if case == "N=0" else (4, C)
    x = make_logits(shape, dtype, seed=8)
    t = make_logits(shape, dtype, seed=9, scale=0.5) if case == "unnormalised" else make_probs(
        shape, dtype
    )
    kw: dict[str, Any] = {"ignore_index": -1} if case == "ignore_index=-1" else {}
    w = make_weight(C, dtype)
    check_cross_entropy(backend, x, t, w, target_grad=True, weight_grad=True,
                        reduction=reduction, label_smoothing=0.1, **kw)  # fmt: skip


# Type promotion on the probability path: the loss is result_type(x, target, weight); each
# gradient comes back in its own tensor's dtype. These are §3's table rows.
PROMOTIONS = [
    (torch.float32, torch.float64, None),
    (torch.float16, torch.float32, None),
    (torch.bfloat16, torch.float16, None),
    (torch.float32, torch.float32, torch.float64),
]


@pytest.mark.parametrize("dtypes", PROMOTIONS, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_prob_target_promotion(backend, dtypes, reduction):
    xd, td, wd = dtypes
    x = make_logits((5, C), xd, seed=10)
    t = make_probs((5, C), td, seed=10)
    w = None if wd is None else make_weight(C, wd)
    r = check_cross_entropy(backend, x, t, w, target_grad=True, weight_grad=True,
                            reduction=reduction, label_smoothing=0.1)  # fmt: skip
    expected = torch.promote_types(torch.promote_types(xd, td), wd or xd)
    assert r.loss.dtype == expected


# --------------------------------------------------------------------------------------------
# layouts


def _noncontig(kind: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A non-contiguous input and a contiguous copy (what torch gets, same values)."""
    if kind == "transposed":  # (N, C) as the transpose of a (C, N) tensor
        x = make_logits((C, 6), dtype, seed=12).t()
    elif kind == "col-stride":  # every other class column: stride 2 along C
        x = make_logits((6, 2 * C), dtype, seed=12)[:, ::2]
    elif kind == "row-stride":  # every other row
        x = make_logits((12, C), dtype, seed=12)[::2]
    elif kind == "channels_last":  # 4-D NHWC memory, NCHW shape
        x = make_logits((2, C, 3, 4), dtype, seed=12).to(memory_format=torch.channels_last)
    else:  # "permuted-3d": (N, C, d) built from (N, d, C)
        x = make_logits((3, 5, C), dtype, seed=12).permute(0, 2, 1)
    assert not x.is_contiguous()
    return x, x.contiguous()


# Every way a real input is non-contiguous: a transposed (N, C), strides along C and along N,
# channels_last 4-D (the class dim has stride 1 but the spatial dims do not), a permuted 3-D.
LAYOUTS = ["transposed", "col-stride", "row-stride", "channels_last", "permuted-3d"]


# crossent gets the strided tensors (targets strided too); torch's run gets contiguous copies.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("weighted,eps", [(False, 0.0), (True, 0.3)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_non_contiguous_index(backend, dtype, layout, weighted, eps, reduction):
    x, xc = _noncontig(layout, dtype)
    t_full = make_targets((2 * x.shape[0], *x.shape[2:]), C, seed=12, ignore_index=-100,
                          ignore_fraction=0.2)  # fmt: skip
    t = t_full[::2]  # the targets are strided too
    w = make_weight(C, dtype) if weighted else None
    check_cross_entropy(backend, x, t, w, torch_inputs=(xc, t.contiguous()),
                        reduction=reduction, label_smoothing=eps)  # fmt: skip


# Probability targets: strided logits and strided targets, with target/weight gradients.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_non_contiguous_prob(backend, dtype, layout, reduction):
    x, xc = _noncontig(layout, dtype)
    t = make_probs(tuple(xc.shape), dtype, seed=13).transpose(0, 1).contiguous().transpose(0, 1)
    w = make_weight(C, dtype)
    check_cross_entropy(backend, x, t, w, target_grad=True, weight_grad=True,
                        torch_inputs=(xc, t.contiguous()), reduction=reduction,
                        label_smoothing=0.2)  # fmt: skip


# --------------------------------------------------------------------------------------------
# extreme logits


def _extreme(kind: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    x = make_logits((6, C), torch.float64, seed=14)
    t = torch.tensor([0, 3, 6, 1, 2, 5])
    if kind == "±1e4":  # huge spreads: exp underflows everywhere but at the max
        x = x * 1e4 / 3
    elif kind == "1e4+O(1)":  # large offset, ordinary spread: losses O(1) must stay accurate
        x = x + 1e4  # (lse - x_y loses ulp(1e4) if lse is formed first; torch does not)
    elif kind == "-1e4+O(1)":
        x = x - 1e4
    elif kind == "-inf-other":  # -inf on non-target classes: p = 0 there
        x[:, 4] = -math.inf
    elif kind == "-inf-target":  # -inf at the target: loss +inf, gradient p - onehot, finite
        x[1, 3] = -math.inf
    elif kind == "+inf":  # a +inf entry: the whole row is NaN
        x[2, 1] = math.inf
    return x.to(dtype), t


EXTREMES = ["±1e4", "1e4+O(1)", "-1e4+O(1)", "-inf-other", "-inf-target", "+inf"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", EXTREMES)
@pytest.mark.parametrize("weighted,eps", OPTIONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_extreme_logits(backend, dtype, kind, weighted, eps, reduction):
    x, t = _extreme(kind, dtype)
    w = make_weight(C, dtype) if weighted else None
    check_cross_entropy(backend, x, t, w, reduction=reduction, label_smoothing=eps)


# The same rows as probability targets, with target and weight gradients (-inf is left out:
# with a probability target it gives NaN by design, covered by the oracle's own tests).
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["±1e4", "1e4+O(1)", "-1e4+O(1)"])
@pytest.mark.parametrize("eps", [0.0, 0.3])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_extreme_logits_prob(backend, dtype, kind, eps, reduction):
    x, _ = _extreme(kind, dtype)
    t = make_probs(tuple(x.shape), dtype, seed=14)
    check_cross_entropy(backend, x, t, make_weight(C, dtype), target_grad=True, weight_grad=True,
                        reduction=reduction, label_smoothing=eps)  # fmt: skip


# Regression: d target and d weight of probability targets with large logits need log p as
# (x - max) - log Σ; forming x - lse loses an ulp of the largest logit. Logits (1e4, 1e4-1,
# 1e4-2), target (0.2, 0.3, 0.5), weights (1, 2, 0.5), 'sum': d target = -w ⊙ log p =
# (0.40761, 2.81521, 1.20380); the x - lse form gave (0.40723, 2.81445, 1.20361).
@pytest.mark.parametrize("big", [1e3, 1e4])
def test_prob_target_grads_large_logits(backend, big):
    x = torch.tensor([[big, big - 1.0, big - 2.0]])
    t = torch.tensor([[0.2, 0.3, 0.5]])
    w = torch.tensor([1.0, 2.0, 0.5])
    check_cross_entropy(backend, x, t, w, target_grad=True, weight_grad=True, reduction="sum")


# Ignored rows holding -inf must give exactly 0 loss and 0 gradient, with and without weights
# and smoothing: torch masks, it never multiplies by 0 (0·inf = NaN). Rows 1 and 3 are ignored
# and hold -inf in several places (row 3 all but one); row 2 has a -inf off its target.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted,eps", OPTIONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_neg_inf_in_ignored_rows(backend, dtype, weighted, eps, reduction):
    x = make_logits((5, C), torch.float64, seed=15)
    x[1, 2] = -math.inf
    x[2, 0] = -math.inf
    x[3, 1:] = -math.inf
    x = x.to(dtype)
    t = torch.tensor([0, -100, 4, -100, 6])
    w = make_weight(C, dtype) if weighted else None
    r = check_cross_entropy(backend, x, t, w, reduction=reduction, label_smoothing=eps)
    assert r.d_input is not None
    assert bool((r.d_input[[1, 3]] == 0).all())
    assert bool(r.d_input.isfinite().all())
    if eps == 0.0:  # with smoothing, row 2's -inf makes its loss +inf (§4.3), as in torch
        assert bool(r.loss.isfinite().all())
    if reduction == "none":
        assert bool((r.loss[[1, 3]] == 0).all())


# An ignored row that is -inf *everywhere*: its log_softmax is NaN. crossent gives exactly 0
# loss and 0 gradient there; torch 2.13 gives loss 0 but a NaN gradient row (its log_softmax
# backward sees NaN), and the oracle follows torch. So this row is checked for exact zeros, and
# the other rows against the oracle evaluated without it (same 'mean' denominator: the row
# is ignored, so it adds nothing to it).
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted,eps", [(False, 0.0), (True, 0.3)])  # plain; both options
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_neg_inf_ignored_row(backend, dtype, weighted, eps, reduction):
    x = make_logits((4, C), torch.float64, seed=16)
    x[2] = -math.inf
    x = x.to(dtype)
    t = torch.tensor([0, 5, -100, 6])
    w = make_weight(C, dtype) if weighted else None
    kw = dict(reduction=reduction, label_smoothing=eps)
    ours = run(lambda *a, **k: crossent.cross_entropy(*a, **k, backend=backend), x, t, w, kw)
    theirs = run(F.cross_entropy, x, t, w, kw)
    assert ours.d_input is not None and theirs.d_input is not None
    assert bool((ours.d_input[2] == 0).all())
    keep = [0, 1, 3]
    okw = dict(weight=_np(w), **kw)
    xk, tk = _np(x[keep]), _np(t[keep])
    ref_loss = reference.cross_entropy(xk, tk, **okw)
    g = ours.grad_out[keep] if reduction == "none" else ours.grad_out
    ref_grad = reference.cross_entropy_grad(xk, tk, _np(g), **okw).input
    if reduction == "none":
        assert ours.loss[2] == 0
        assert_close_to_oracle(ours.loss[keep], ref_loss, theirs.loss[keep], what="loss")
    else:
        assert_close_to_oracle(ours.loss, ref_loss, theirs.loss, what="loss")
    assert_close_to_oracle(ours.d_input[keep], ref_grad, theirs.d_input[keep], what="d input")


# --------------------------------------------------------------------------------------------
# class counts: blocks, chunks, real vocabularies


# V below, at and just past a power-of-two block (256, 1024), and 1000, a real vocabulary
# (ImageNet); small M so the reference backend stays quick.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [255, 256, 257, 1000, 1023, 1024, 1025])
@pytest.mark.parametrize("weighted,eps", [(False, 0.0), (True, 0.1)])
def test_class_counts(backend, dtype, V, weighted, eps):
    x = make_logits((4, V), dtype, seed=16)
    t = make_targets((4,), V, seed=16, ignore_index=-100, ignore_fraction=0.25)
    w = make_weight(V, dtype) if weighted else None
    check_cross_entropy(backend, x, t, w, reduction="none", label_smoothing=eps)


# Rows longer than any kernel's block of columns (Triton: 2048 float64, 4096 float32, 8192
# 16-bit), so a row's max, sum and smoothing sum are carried from block to block: the max in
# the last block, a first block of only -inf, large logits, targets on the last column.
LONG_V = 3 * 8192 + 5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted,eps", [(False, 0.0), (True, 0.0), (False, 0.2), (True, 0.2)])
def test_rows_longer_than_a_block(backend, dtype, weighted, eps):
    x = make_logits((5, LONG_V), dtype, seed=22)
    x[1, -1] = 40.0  # the max in the last block
    x[2, :9000] = -math.inf  # every logit of the first blocks -inf
    x[3] *= 1000.0  # exp(x) overflows without the shift
    t = torch.tensor([LONG_V - 1, 3, LONG_V - 2, 100, -100])
    w = make_weight(LONG_V, dtype) if weighted else None
    check_cross_entropy(backend, x, t, w, reduction="none", label_smoothing=eps)


# Many rows: on CPU the 'mean' denominator and the sum of the row losses are taken over chunks
# of _SUM_CHUNK rows (a float64 copy of a whole long vector would add to the memory peak);
# ignored rows and weights in every chunk, and a partial last chunk.
LONG_M = 2 * _autograd._SUM_CHUNK + 5
# Triton's interpreter runs one program per row in Python: tens of thousands of rows take
# minutes there, and what these cases check lies above the backends.
ROW_BACKENDS = [b for b in dispatch.available() if b != "triton"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("backend", ROW_BACKENDS)
def test_many_rows_reduced_in_chunks(backend, dtype, weighted, reduction):
    x = make_logits((LONG_M, C), dtype, seed=20)
    t = make_targets((LONG_M,), C, seed=20, ignore_index=-100, ignore_fraction=0.25)
    w = make_weight(C, dtype) if weighted else None
    check_cross_entropy(backend, x, t, w, reduction=reduction)


needs_torch_backend = pytest.mark.parametrize("backend", ["torch"])
# The reference backend is left out below: it runs the float64 NumPy oracle on every element
# (tens of millions of float64 operations per case), and the chunking these cases exercise
# exists only in the torch backend.

# M·V > CHUNK_ELEMENTS = 2**20 with V = 32000 (LLaMA's vocabulary): rows per chunk = 32, so
# M = 45 runs a full chunk and a partial one; ignored rows straddle the chunk boundary.
BIG_M, BIG_V = 45, 32000
assert BIG_M * BIG_V > torch_backend.CHUNK_ELEMENTS > (BIG_M - 13) * BIG_V


@needs_torch_backend
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted,eps,reduction", [(False, 0.0, "mean"), (True, 0.1, "none")])
def test_real_vocab_several_chunks(backend, dtype, weighted, eps, reduction):
    x = make_logits((BIG_M, BIG_V), dtype, seed=17)
    t = make_targets((BIG_M,), BIG_V, seed=17, ignore_index=-100, ignore_fraction=0.2)
    t[31:33] = -100  # the last row of chunk 1 and the first of chunk 2
    w = make_weight(BIG_V, dtype) if weighted else None
    check_cross_entropy(backend, x, t, w, reduction=reduction, label_smoothing=eps)


@needs_torch_backend
@pytest.mark.parametrize("dtype,reduction", [(torch.float32, "none"), (torch.bfloat16, "sum")])
def test_prob_targets_several_chunks(backend, dtype, reduction):
    # the target and weight gradients are chunked too (cross_entropy_prob_extra_grads)
    x = make_logits((BIG_M, BIG_V), dtype, seed=18)
    t = make_probs((BIG_M, BIG_V), dtype, seed=18)
    w = make_weight(BIG_V, dtype)
    check_cross_entropy(backend, x, t, w, target_grad=True, weight_grad=True,
                        reduction=reduction, label_smoothing=0.1)  # fmt: skip


# V > CHUNK_ELEMENTS: one row per chunk (chunk_rows = 1), two chunks, the second ignored
# (float32: the accumulation dtype itself; bfloat16: the upcast path).
HUGE_V = torch_backend.CHUNK_ELEMENTS + 3


@needs_torch_backend
@pytest.mark.parametrize("dtype,weighted,eps", [(torch.float32, False, 0.0),
                                                (torch.bfloat16, True, 0.1)])  # fmt: skip
def test_single_row_chunks(backend, dtype, weighted, eps):
    assert torch_backend.chunk_rows(3, HUGE_V) == 1
    x = make_logits((3, HUGE_V), dtype, seed=19)
    t = torch.tensor([HUGE_V - 1, -100, 5])
    w = make_weight(HUGE_V, dtype) if weighted else None
    check_cross_entropy(backend, x, t, w, reduction="none", label_smoothing=eps)


# --------------------------------------------------------------------------------------------
# autograd behaviour


# Each path: plain index, index with weight + smoothing + ignore, probability targets with
# target/weight gradients. 'none' gets a tensor gradient, 'mean' the hand-over-the-buffer path.
PATHS = ["index", "index-options", "prob"]


def _path_inputs(path: str, dtype: torch.dtype = torch.float64):
    x = make_logits((6, C), dtype, seed=20)
    if path == "prob":
        return x, make_probs((6, C), dtype, seed=20), make_weight(C, dtype), {
            "label_smoothing": 0.2
        }
    t = make_targets((6,), C, seed=20, ignore_index=3, ignore_fraction=0.3)
    if path == "index":
        return x, t, None, {}
    return x, t, make_weight(C, dtype), {"ignore_index": 3, "label_smoothing": 0.2}


# float64 and bfloat16: the saved gradient buffer is kept in the logits' dtype.
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_retain_graph_second_backward(backend, dtype, path, reduction):
    # backward(retain_graph=True) then backward() again accumulates exactly twice the gradient,
    # as in torch; the buffer crossent saved in forward must survive the first backward intact.
    x, t, w, kw = _path_inputs(path, dtype)
    prob = path == "prob"
    results = []
    for fn in (lambda *a, **k: crossent.cross_entropy(*a, **k, backend=backend),
               F.cross_entropy):  # fmt: skip
        xi = x.detach().clone().requires_grad_()
        ti = t.detach().clone().requires_grad_() if prob else t
        wi = None if w is None else w.detach().clone().requires_grad_(prob)
        loss = fn(xi, ti, wi, reduction=reduction, **kw)
        g = grad_output_for(loss, reduction)
        loss.backward(g, retain_graph=True)
        first = [a.grad.clone() for a in (xi, ti, wi) if a is not None and a.requires_grad]
        loss.backward(g)
        now = [a.grad for a in (xi, ti, wi) if a is not None and a.requires_grad]
        for f, n in zip(first, now, strict=True):
            assert torch.equal(n, 2 * f)
        results.append((now, g))
    (ours, g), (theirs, _) = results
    okw = dict(weight=_np(w), reduction=reduction, **kw)
    grads = reference.cross_entropy_grad(_np(x), _np(t), 2 * _np(g), **okw)
    oracle = [grads.input] + ([grads.target, grads.weight] if prob else [])
    names = ["input", "target", "weight"][: len(oracle)]
    for o, th, r, what in zip(ours, theirs, oracle, names, strict=True):
        assert_close_to_oracle(o, r, th, what=f"accumulated d {what}")


# gradcheck runs in float64 for every reduction ('none' checks the full Jacobian).
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_index(backend, reduction):
    # weights + smoothing + ignore_index together; targets hit the ignored class 1
    x = make_logits((4, 5), torch.float64, seed=21, requires_grad=True)
    t = torch.tensor([1, 0, 4, 1])
    w = make_weight(5, torch.float64)

    def f(x):
        return crossent.cross_entropy(x, t, w, ignore_index=1, reduction=reduction,
                                      label_smoothing=0.15, backend=backend)  # fmt: skip

    assert torch.autograd.gradcheck(f, (x,))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_prob(backend, reduction):
    # with respect to input, target and weight at once, with smoothing
    x = make_logits((3, 4), torch.float64, seed=22, requires_grad=True)
    t = make_probs((3, 4), torch.float64, seed=22).requires_grad_()
    w = make_weight(4, torch.float64).requires_grad_()

    def f(x, t, w):
        return crossent.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.15,
                                      backend=backend)  # fmt: skip

    assert torch.autograd.gradcheck(f, (x, t, w))


# Every dtype (the half types take the upcast path), every path, and every reduction ('mean'
# with grad 1 hands the saved buffer over without a copy).
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_inputs_not_modified(backend, dtype, path, reduction):
    # base.py allows a gradient buffer to alias the logits: make sure none of it leaks out
    x, t, w, kw = _path_inputs(path, dtype)
    x = x.requires_grad_()
    prob = path == "prob"
    if prob:
        t.requires_grad_()
    inputs = [a for a in (x, t, w) if a is not None]
    saved = [a.detach().clone() for a in inputs]
    loss = crossent.cross_entropy(x, t, w, reduction=reduction, backend=backend, **kw)
    loss.backward(grad_output_for(loss, reduction))
    for before, after in zip(saved, inputs, strict=True):
        assert torch.equal(before, after.detach())


def _spy_forward(monkeypatch, backend: str, method: str) -> list[Any]:
    """Record the ``grad_out`` argument each call of ``method`` receives."""
    be = dispatch.resolve(backend, torch.zeros(1))
    orig = getattr(be, method)
    seen: list[Any] = []

    def spy(x, target, weight, opts, grad_out=None, grad_scale=None):
        seen.append(grad_out)
        return orig(x, target, weight, opts, grad_out, grad_scale)

    monkeypatch.setattr(be, method, spy)
    return seen


# Inference: no graph, and the same numbers as with autograd on.
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_grad_result(backend, path, reduction):
    x, t, w, kw = _path_inputs(path, torch.float32)
    x.requires_grad_()
    with torch.no_grad():
        loss = crossent.cross_entropy(x, t, w, reduction=reduction, backend=backend, **kw)
        expected = F.cross_entropy(x, t, w, reduction=reduction, **kw)
    assert loss.grad_fn is None and not loss.requires_grad
    oracle = reference.cross_entropy(_np(x), _np(t), _np(w), reduction=reduction,
                                     **kw)  # fmt: skip
    assert_close_to_oracle(loss, oracle, expected)


@pytest.mark.parametrize("path", PATHS)
def test_no_grad_allocates_no_gradient(backend, path, monkeypatch):
    # Inference on logits that require grad (a model's output under torch.no_grad()): the fused
    # forward must not be asked to compute and store a (M, V) gradient nobody will read.
    method = "cross_entropy_prob_forward" if path == "prob" else "cross_entropy_forward"
    seen = _spy_forward(monkeypatch, backend, method)
    x, t, w, kw = _path_inputs(path, torch.float32)
    x.requires_grad_()
    with torch.no_grad():
        crossent.cross_entropy(x, t, w, backend=backend, **kw)
    assert seen == [None]
