"""Property tests: random problems through crossent (torch backend), torch and the oracle.

Hypothesis draws the shape (N in 0..6, C in 1..9, up to three extra K dims, or unbatched), the
dtype, class weights, ignore_index, reduction, label smoothing, and index versus probability
targets; crossent's values and gradients must satisfy the one tolerance rule
(:func:`crossent.testing.assert_close_to_oracle`) with torch's own result as the yardstick.
``derandomize=True``: the examples are a fixed function of the test, so CI is deterministic.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from oracle_inputs import _np

import crossent
from crossent import reference
from crossent.testing import (
    assert_close_to_oracle,
    make_logits,
    make_probs,
    make_targets,
    make_weight,
)

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
REDUCTIONS = ["none", "mean", "sum"]
FUZZ = settings(
    max_examples=1000,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _grad_output(out: torch.Tensor, reduction: str, seed: int) -> torch.Tensor:
    # non-uniform and signed for 'none'; a scalar other than 1 for 'sum'; 1 for 'mean'
    if reduction == "none":
        return make_logits(tuple(out.shape), out.dtype, seed=seed, scale=1.0)
    return torch.tensor(1.0 if reduction == "mean" else -1.5, dtype=out.dtype)


def _representable(oracle: Any, dtype: torch.dtype) -> bool:
    """Whether every finite oracle value fits the result dtype.

    The rule compares with the unrounded float64 oracle, so it cannot judge a value whose exact
    result overflows the dtype (float16 'sum' of 1e4 logits): there the right answer is ±inf,
    and torch itself may give NaN. Such draws are discarded, not loosened.
    """
    a = np.asarray(oracle, dtype=np.float64)
    return bool(np.all(np.abs(a[np.isfinite(a)]) <= torch.finfo(dtype).max))


def _run(fn: Any, x, target, weight, kw, target_grad, weight_grad, seed):
    xi = x.detach().requires_grad_()
    ti = target.detach().requires_grad_() if target_grad else target
    wi = None if weight is None else weight.detach().requires_grad_(weight_grad)
    loss = fn(xi, ti, wi, **kw)
    g = _grad_output(loss, kw["reduction"], seed)
    loss.backward(g)
    grads = [xi.grad, ti.grad if target_grad else None, wi.grad if weight_grad else None]
    return loss.detach(), g, grads


# --------------------------------------------------------------------------------------------
# cross_entropy


@st.composite
def cross_entropy_problems(draw: Any) -> dict[str, Any]:
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(0, 6))
    c = draw(st.integers(1, 9))
    kdims = draw(st.lists(st.integers(0, 3), max_size=3))  # (N, C), 3-D, 4-D (nll2d), 5-D
    shape = (c,) if draw(st.integers(0, 9)) == 0 else (n, c, *kdims)  # 1 in 10 unbatched
    cdim = 0 if len(shape) == 1 else 1
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([0.1, 3.0, 30.0, 3e3]))  # flat, typical, peaked, ±1e4
    x = make_logits(shape, dtype, seed=seed, scale=scale)
    reduction = draw(st.sampled_from(REDUCTIONS))
    eps = draw(st.sampled_from([0.0, -0.5, 0.1, 0.5, 1.0]) | st.floats(0.0, 1.0))
    prob = draw(st.booleans())
    weighted = draw(st.booleans())
    kw: dict[str, Any] = {"reduction": reduction, "label_smoothing": eps}
    if prob:
        # targets in x's dtype or another (promotion); distributions or arbitrary values
        tdtype = draw(st.sampled_from([dtype, dtype, *DTYPES]))
        if draw(st.booleans()):
            target = make_probs(shape, tdtype, seed=seed)
        else:
            target = make_logits(shape, tdtype, seed=seed + 1, scale=0.5)
        wdtype = draw(st.sampled_from([dtype, *DTYPES]))
        weight = make_weight(c, wdtype, seed=seed) if weighted else None
        kw["ignore_index"] = draw(st.sampled_from([-100, -1]))  # negative: silently unused
        target_grad = draw(st.booleans())
        weight_grad = weighted and draw(st.booleans())
    else:
        ii = draw(st.sampled_from([-100, -1, 0, c - 1, c, c + 2]))  # negative, in [0,C), >= C
        frac = draw(st.sampled_from([0.0, 0.3, 1.0]))  # none, some, all ignored
        target = make_targets(shape[:cdim] + shape[cdim + 1 :], c, seed=seed,
                              ignore_index=ii, ignore_fraction=frac)  # fmt: skip
        if len(shape) <= 2 and not (weighted and eps > 0) and draw(st.booleans()):
            # uint8 targets: 1-D/2-D input only (and torch cannot smooth with weights on them)
            if bool(((target >= 0) & (target < 256)).all()):
                target = target.to(torch.uint8)
        weight = make_weight(c, dtype, seed=seed) if weighted else None
        kw["ignore_index"] = ii
        target_grad = weight_grad = False
    return dict(x=x, target=target, weight=weight, kw=kw, target_grad=target_grad,
                weight_grad=weight_grad, seed=seed)  # fmt: skip


@FUZZ
@given(p=cross_entropy_problems())
def test_cross_entropy_matches_oracle(p: dict[str, Any]) -> None:
    x, target, weight, kw = p["x"], p["target"], p["weight"], p["kw"]
    tg, wg, seed = p["target_grad"], p["weight_grad"], p["seed"]

    def ours_fn(*a: Any, **k: Any) -> torch.Tensor:
        return crossent.cross_entropy(*a, **k, backend="torch")

    loss, g, grads = _run(ours_fn, x, target, weight, kw, tg, wg, seed)
    t_loss, _, t_grads = _run(F.cross_entropy, x, target, weight, kw, tg, wg, seed)
    assert loss.dtype == t_loss.dtype and loss.shape == t_loss.shape

    okw = dict(weight=_np(weight), **kw)
    xn, tn = _np(x), _np(target)
    oracle = reference.cross_entropy(xn, tn, **okw)
    assume(_representable(oracle, loss.dtype))
    assert_close_to_oracle(loss, oracle, t_loss, what="loss")
    r = reference.cross_entropy_grad(xn, tn, _np(g), **okw)
    names = ["input", "target", "weight"]
    for ours, theirs, oracle, what in zip(grads, t_grads, r, names, strict=True):
        if ours is None:
            continue
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        assert_close_to_oracle(ours, oracle, theirs, what=f"d {what}")


# --------------------------------------------------------------------------------------------
# nll_loss


@st.composite
def nll_problems(draw: Any) -> dict[str, Any]:
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(0, 6))
    c = draw(st.integers(1, 9))
    kdims = draw(st.lists(st.integers(0, 3), max_size=3))
    shape = (c,) if draw(st.integers(0, 9)) == 0 else (n, c, *kdims)
    cdim = 0 if len(shape) == 1 else 1
    seed = draw(st.integers(0, 2**16))
    x = make_logits(shape, dtype, seed=seed, scale=draw(st.sampled_from([0.1, 3.0, 3e3])))
    ii = draw(st.sampled_from([-100, -1, 0, c - 1, c, c + 2]))
    frac = draw(st.sampled_from([0.0, 0.3, 1.0]))
    target = make_targets(shape[:cdim] + shape[cdim + 1 :], c, seed=seed, ignore_index=ii,
                          ignore_fraction=frac)  # fmt: skip
    weight = make_weight(c, dtype, seed=seed) if draw(st.booleans()) else None
    kw = {"ignore_index": ii, "reduction": draw(st.sampled_from(REDUCTIONS))}
    return dict(x=x, target=target, weight=weight, kw=kw, seed=seed)


@settings(FUZZ, max_examples=400)
@given(p=nll_problems())
def test_nll_loss_matches_oracle(p: dict[str, Any]) -> None:
    x, target, weight, kw, seed = p["x"], p["target"], p["weight"], p["kw"], p["seed"]

    def ours_fn(*a: Any, **k: Any) -> torch.Tensor:
        return crossent.nll_loss(*a, **k, backend="torch")

    loss, g, (gx, _, _) = _run(ours_fn, x, target, weight, kw, False, False, seed)
    t_loss, _, (t_gx, _, _) = _run(F.nll_loss, x, target, weight, kw, False, False, seed)
    assert loss.dtype == t_loss.dtype and loss.shape == t_loss.shape
    okw = dict(weight=_np(weight), **kw)
    xn, tn = _np(x), _np(target)
    oracle = reference.nll_loss(xn, tn, **okw)
    assume(_representable(oracle, loss.dtype))
    assert_close_to_oracle(loss, oracle, t_loss, what="loss")
    oracle = reference.nll_loss_grad(xn, tn, _np(g), **okw)
    assert_close_to_oracle(gx, oracle, t_gx, what="d input")


# --------------------------------------------------------------------------------------------
# softmax / log_softmax


@settings(FUZZ, max_examples=400)
@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(0, 6), max_size=4),  # 0-d to 4-D, empty dims included
    dim_seed=st.integers(0, 2**16),
    log=st.booleans(),
    scale=st.sampled_from([0.1, 3.0, 3e3]),
)
def test_softmax_matches_oracle(dtype, shape, dim_seed, log, scale) -> None:
    ndim = max(len(shape), 1)
    dim = dim_seed % (2 * ndim) - ndim  # every dim, negative and positive
    x = make_logits(tuple(shape), dtype, seed=dim_seed, scale=scale)
    fn, tfn = (crossent.log_softmax, F.log_softmax) if log else (crossent.softmax, F.softmax)
    rfn, rgrad = (
        (reference.log_softmax, reference.log_softmax_grad)
        if log
        else (reference.softmax, reference.softmax_grad)
    )
    outs = []
    for f in (lambda a, d: fn(a, d, backend="torch"), tfn):
        xi = x.detach().requires_grad_()
        out = f(xi, dim)
        g = make_logits(tuple(out.shape), dtype, seed=dim_seed + 1, scale=1.0)
        out.backward(g)
        outs.append((out.detach(), xi.grad, g))
    (out, gx, g), (t_out, t_gx, _) = outs
    assert out.dtype == t_out.dtype and out.shape == t_out.shape
    assert_close_to_oracle(out, rfn(_np(x), dim), t_out, what="output")
    assert_close_to_oracle(gx, rgrad(_np(x), dim, _np(g)), t_gx, what="d input")
