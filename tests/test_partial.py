"""Cross entropy over slices of the classes: each slice's partial statistics, merged, give the
whole row's loss, lse and gradient (``backends/base.py``: ``merge_index``, ``merge_prob``)."""

from __future__ import annotations

import pytest
import torch

from crossent import dispatch
from crossent.backends.base import INDEX_PARTS, PROB_PARTS, RowOptions, merge_index, merge_prob
from crossent.testing import assert_close_to_oracle, make_probs

SPLITS = {
    "one": [29],
    "two": [13, 16],
    "three uneven, one empty": [20, 0, 9],
    "single classes": [1, 27, 1],
}

OPTIONS = {
    "plain": {},
    "weights": {"weighted": True},
    "smoothing": {"label_smoothing": 0.2},
    "weighted smoothing": {"label_smoothing": 0.1, "weighted": True},
    "z-loss": {"z_loss": 1e-2},
    "softcap+temperature": {"softcap": 3.0, "temperature": 0.7, "label_smoothing": 0.1},
}


def _inputs(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(11, 29, generator=g, dtype=torch.float64) * 4).to(dtype)
    t = torch.randint(0, 29, (11,), generator=g)
    t[2] = -100
    t[5] = 0  # the first class, t[6] the last one
    t[6] = 28
    x[7, 3:9] = float("-inf")  # -inf logits inside one slice (and the whole of some)
    x[8, 13:] = float("-inf")
    w = torch.rand(29, generator=g, dtype=torch.float64).to(dtype) + 0.25
    return x, t, w


def _opts(kw: dict) -> tuple[RowOptions, bool]:
    kw = dict(kw)
    weighted = kw.pop("weighted", False)
    return RowOptions(**kw), weighted


def _split(x: torch.Tensor, sizes: list[int]) -> list[tuple[int, torch.Tensor]]:
    out, start = [], 0
    for n in sizes:
        out.append((start, x[:, start : start + n]))
        start += n
    return out


def _scale() -> torch.Tensor:
    return torch.linspace(0.5, 1.5, 11, dtype=torch.float64)


@pytest.mark.parametrize("split", list(SPLITS), ids=list(SPLITS))
@pytest.mark.parametrize("name", list(OPTIONS), ids=list(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["torch", "cpu", "reference"])
def test_index_partials_merge_to_the_whole_row(
    backend: str, dtype: torch.dtype, name: str, split: str
) -> None:
    opts, weighted = _opts(OPTIONS[name])
    x, t, w = _inputs(dtype)
    weight = w if weighted else None
    be = dispatch.resolve(backend, x)
    slices = _split(x, SPLITS[split])
    parts = torch.stack(
        [be.cross_entropy_partial(xs, t, weight, opts, s0, 29) for s0, xs in slices]
    )
    assert parts.shape == (len(slices), INDEX_PARTS, 11) and parts.dtype == torch.float64
    merged = merge_index(parts, t, weight, opts, 29)
    grad = torch.empty_like(x)
    scale = _scale().to(torch.float32 if dtype != torch.float64 else dtype)
    for s0, xs in slices:
        g = torch.empty_like(xs)
        be.cross_entropy_partial_grad(xs, t, weight, opts, s0, 29, merged, g, scale)
        grad[:, s0 : s0 + xs.shape[1]] = g

    oracle = dispatch.resolve("reference", x)
    want_grad = torch.empty(x.shape, dtype=torch.float64)
    want = oracle.cross_entropy_forward(x, t, weight, opts, want_grad, scale.double())
    tgrad = torch.empty_like(x)
    ref = dispatch.resolve("torch", x).cross_entropy_forward(x, t, weight, opts, tgrad, scale)
    assert_close_to_oracle(merged.loss, want.loss, ref.loss, dtype, "loss")
    keep = t != -100
    assert_close_to_oracle(merged.lse[keep], want.lse[keep], ref.lse[keep], dtype, "lse")
    assert_close_to_oracle(grad, want_grad, tgrad, dtype, "gradient")
    assert torch.equal(grad[~keep], torch.zeros_like(grad[~keep]))


@pytest.mark.parametrize("split", list(SPLITS), ids=list(SPLITS))
@pytest.mark.parametrize("name", list(OPTIONS), ids=list(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["torch", "cpu", "reference"])
def test_prob_partials_merge_to_the_whole_row(
    backend: str, dtype: torch.dtype, name: str, split: str
) -> None:
    opts, weighted = _opts(OPTIONS[name])
    x, _, w = _inputs(dtype)
    x[7:9] = x[7:9].nan_to_num(neginf=-30.0)  # 0·(-inf) is NaN in torch: kept apart below
    p = make_probs((11, 29), dtype, seed=3)
    weight = w if weighted else None
    be = dispatch.resolve(backend, x)
    slices = _split(x, SPLITS[split])
    parts = torch.stack([
        be.cross_entropy_prob_partial(xs, p[:, s0 : s0 + xs.shape[1]], weight, opts, s0, 29)
        for s0, xs in slices
    ])  # fmt: skip
    assert parts.shape == (len(slices), PROB_PARTS, 11)
    merged = merge_prob(parts, opts)
    grad = torch.empty_like(x)
    scale = _scale().to(dtype)
    for s0, xs in slices:
        g = torch.empty_like(xs)
        ps = p[:, s0 : s0 + xs.shape[1]]
        be.cross_entropy_prob_partial_grad(xs, ps, weight, opts, s0, 29, merged, g, scale)
        grad[:, s0 : s0 + xs.shape[1]] = g

    oracle = dispatch.resolve("reference", x)
    want_grad = torch.empty(x.shape, dtype=torch.float64)
    want = oracle.cross_entropy_prob_forward(x, p, weight, opts, want_grad, scale.double())
    tgrad = torch.empty_like(x)
    ref = dispatch.resolve("torch", x).cross_entropy_prob_forward(x, p, weight, opts, tgrad, scale)
    assert_close_to_oracle(merged.loss, want.loss, ref.loss, dtype, "loss")
    assert_close_to_oracle(merged.lse, want.lse, ref.lse, dtype, "lse")
    assert_close_to_oracle(grad, want_grad, tgrad, dtype, "gradient")


# Rows torch's log_softmax makes NaN throughout (a NaN, a +inf, or only -inf): NaN whichever
# slice holds the culprit; an ignored row stays 0. The merge is the same bits wherever it runs.
@pytest.mark.parametrize("split", ["two", "three uneven, one empty"])
@pytest.mark.parametrize("backend", ["torch", "cpu", "reference"])
def test_bad_rows_and_determinism(backend: str, split: str) -> None:
    x, t, _ = _inputs(torch.float32)
    x[0, 4] = float("nan")
    x[1, 25] = float("inf")
    x[3] = float("-inf")
    t[4] = -100
    x[4, 0] = float("nan")
    opts = RowOptions(label_smoothing=0.1)
    be = dispatch.resolve(backend, x)
    slices = _split(x, SPLITS[split])
    parts = torch.stack([be.cross_entropy_partial(xs, t, None, opts, s0, 29) for s0, xs in slices])
    merged = merge_index(parts, t, None, opts, 29)
    assert merged.loss[[0, 1, 3]].isnan().all() and merged.lse[[0, 1, 3]].isnan().all()
    assert merged.loss[4] == 0
    assert merged.loss[[5, 6, 9, 10]].isfinite().all()
    again = merge_index(parts.clone(), t, None, opts, 29)
    for a, b in zip(merged, again, strict=True):
        assert torch.equal(a.view(torch.int64), b.view(torch.int64))


# The same rows with probability targets: the CPU kernels' partial statistics and gradient
# give NaN exactly where the portable backend's do, and values within the tolerance elsewhere.
@pytest.mark.parametrize("softcap", [None, 5.0])  # capped, ±inf logits are ±5: finite rows
@pytest.mark.parametrize("split", ["two", "three uneven, one empty"])
def test_prob_bad_rows_cpu_as_torch(split: str, softcap: float | None) -> None:
    x, _, w = _inputs(torch.float32)
    x[0, 4] = float("nan")
    x[1, 25] = float("inf")
    x[3] = float("-inf")
    p = make_probs((11, 29), torch.float32, seed=4)
    opts = RowOptions(label_smoothing=0.1, softcap=softcap)
    out = []
    for name in ("cpu", "torch"):
        be = dispatch.resolve(name, x)
        slices = _split(x, SPLITS[split])
        parts = torch.stack([
            be.cross_entropy_prob_partial(xs, p[:, s0 : s0 + xs.shape[1]], w, opts, s0, 29)
            for s0, xs in slices
        ])  # fmt: skip
        merged = merge_prob(parts, opts)
        grad = torch.empty_like(x)
        for s0, xs in slices:
            g = torch.empty_like(xs)
            ps = p[:, s0 : s0 + xs.shape[1]]
            be.cross_entropy_prob_partial_grad(xs, ps, w, opts, s0, 29, merged, g, None)
            grad[:, s0 : s0 + xs.shape[1]] = g
        out.append((merged.loss, merged.lse, grad))
    for a, b in zip(*out, strict=True):
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-5, atol=1e-6)
    assert out[0][0][[0, 1, 3] if softcap is None else [0]].isnan().all()
    assert out[0][0][[2, 4, 5]].isfinite().all()
