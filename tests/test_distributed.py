"""Vocabulary-parallel cross entropy: ranks of a gloo group on this machine, each holding a
slice of the classes, against the float64 oracle on the whole logits (torch's own error on the
whole logits as the yardstick). The ranks run ``dist_worker.py``; its cases list every option."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_worker import CASES, LINEAR_CASES, Case, LinearCase, build, build_linear, grad_for

from crossent import reference
from crossent.distributed import (
    shard_offsets,
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)
from crossent.testing import assert_close_to_oracle

WORKER = Path(__file__).with_name("dist_worker.py")
WORLDS = sorted({c.world for c in [*CASES, *LINEAR_CASES]})


@pytest.fixture(scope="module")
def ranks_results(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, Any]]]:
    """For each world size, every rank's ``{case: (loss, grad of its slice)}``."""
    out: dict[int, list[dict[str, Any]]] = {}
    for world in WORLDS:
        d = tmp_path_factory.mktemp(f"world{world}")
        procs = [
            subprocess.Popen(
                [sys.executable, str(WORKER), str(r), str(world), str(d / "store"), str(d)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            for r in range(world)
        ]  # fmt: skip
        logs = [p.communicate(timeout=600)[0] for p in procs]
        for r, p in enumerate(procs):
            assert p.returncode == 0, f"rank {r} of {world} failed:\n{logs[r]}"
        out[world] = [torch.load(d / f"rank{r}.pt") for r in range(world)]
    return out


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().to(torch.float64).numpy()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_cross_entropy_on_the_whole_logits(
    case: Case, ranks_results: dict[int, list[dict[str, Any]]]
) -> None:
    per_rank = [r[case.name] for r in ranks_results[case.world]]
    losses = [loss for loss, _ in per_rank]
    for loss in losses[1:]:  # every rank returns the same loss, bit for bit
        assert torch.equal(loss, losses[0]) or (loss.isnan() == losses[0].isnan()).all()
    _check(case, losses[0], torch.cat([g for _, g in per_rank], dim=case.class_dim))


@pytest.mark.parametrize(
    "case", [c for c in CASES if not c.kw.get("inplace_backward")], ids=lambda c: c.name
)
def test_dtensor_logits_sharded_on_the_class_dim(
    case: Case, ranks_results: dict[int, list[dict[str, Any]]]
) -> None:
    per_rank = [r["dtensor " + case.name] for r in ranks_results[case.world]]
    for loss, grad in per_rank[1:]:  # a replicated loss; every rank sees the whole gradient
        assert torch.equal(loss, per_rank[0][0]) or (loss.isnan() == per_rank[0][0].isnan()).all()
        assert torch.equal(grad.nan_to_num(), per_rank[0][1].nan_to_num())
    _check(case, *per_rank[0])


def _check(case: Case, loss: torch.Tensor, grad: torch.Tensor) -> None:
    """The loss and the whole gradient against the oracle on the whole logits."""
    x, t, w = build(case, seed=CASES.index(case))
    kw = dict(case.kw)
    kw.pop("inplace_backward", None)
    red = kw.get("reduction", "mean")
    okw = dict(weight=_np(w), **kw)
    extended = any(k in kw for k in ("z_loss", "softcap", "temperature"))
    theirs_loss = theirs_grad = None
    if not extended:  # torch's own error on the whole logits, the yardstick
        xt = x.clone().requires_grad_()
        tl = F.cross_entropy(xt, t, w, **kw)
        tl.backward(grad_for(tl, red))
        theirs_loss, theirs_grad = tl.detach(), xt.grad
        assert loss.dtype == tl.dtype and loss.shape == tl.shape
    assert grad.dtype == x.dtype and grad.shape == x.shape
    xn, tn = _np(x), (_np(t) if case.prob else t.numpy())
    assert_close_to_oracle(loss, reference.cross_entropy(xn, tn, **okw), theirs_loss,
                           dtype=x.dtype, what="loss")  # fmt: skip
    oracle = reference.cross_entropy_grad(xn, tn, _np(grad_for(loss, red)), **okw)
    assert_close_to_oracle(grad, oracle.input, theirs_grad, what="d input")


@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: c.name)
def test_linear_head_matches_the_whole_head(
    case: LinearCase, ranks_results: dict[int, list[dict[str, Any]]]
) -> None:
    x, w, b, t, cw = build_linear(case, seed=100 + LINEAR_CASES.index(case))
    per_rank = [r[case.name] for r in ranks_results[case.world]]
    for loss, dx, _, _ in per_rank[1:]:  # the same loss and d(input) on every rank
        assert torch.equal(loss, per_rank[0][0])
        assert torch.equal(dx, per_rank[0][1])
    loss, dx = per_rank[0][0], per_rank[0][1]
    dw = torch.cat([r[2] for r in per_rank])
    kw = dict(case.kw)
    red = kw.get("reduction", "mean")
    extended = any(k in kw for k in ("z_loss", "softcap", "temperature"))
    # the whole head in float64: the oracle of the loss and of d(logits), then d x, d W, d b
    x64, w64 = x.double(), w.double()
    logits = x64 @ w64.t() + (0 if b is None else b.double())
    okw = dict(weight=_np(cw), **kw)
    ln, tn = logits.numpy(), t.numpy()
    g = grad_for(loss, red)
    oracle = reference.cross_entropy_grad(ln, tn, _np(g), **okw)
    gl = torch.from_numpy(oracle.input)
    want = {"loss": torch.as_tensor(reference.cross_entropy(ln, tn, **okw)), "dx": gl @ w64,
            "dw": gl.t() @ x64, "db": gl.sum(0)}  # fmt: skip
    theirs: dict[str, torch.Tensor | None] = dict.fromkeys(want)
    if not extended:  # torch's own error on the whole head, the yardstick
        xt, wt = x.clone().requires_grad_(), w.clone().requires_grad_()
        bt = None if b is None else b.clone().requires_grad_()
        tl = F.cross_entropy(F.linear(xt, wt, bt), t, cw, **kw)
        tl.backward(g)
        theirs = {"loss": tl.detach(), "dx": xt.grad, "dw": wt.grad,
                  "db": None if bt is None else bt.grad}  # fmt: skip
    ours = {"loss": loss, "dx": dx, "dw": dw}
    if b is not None:
        ours["db"] = torch.cat([r[3] for r in per_rank])
    assert loss.dtype == case.dtype and dx.dtype == case.dtype and dw.dtype == case.dtype
    for k, v in ours.items():
        assert_close_to_oracle(v, want[k], theirs[k], dtype=case.dtype, what=k)


def test_needs_a_process_group() -> None:
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="init_process_group"):
        shard_offsets(3)


@pytest.fixture()
def one_rank_group(tmp_path: Path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)  # fmt: skip
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_one_rank_is_cross_entropy(one_rank_group: None) -> None:
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 6, -100, 3, 2])
    ours = vocab_parallel_cross_entropy(x, t, label_smoothing=0.1)
    (g,) = torch.autograd.grad(ours, x)
    xt = x.detach().requires_grad_()
    theirs = F.cross_entropy(xt, t, label_smoothing=0.1)
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, xt.grad, rtol=1e-12, atol=1e-12)
    assert shard_offsets(7) == (0, 7)


@pytest.mark.parametrize(
    "target,match",
    [(torch.tensor([0, 7]), "Target 7 is out of bounds"),
     (torch.tensor([-1, 0]), "Target -1 is out of bounds")],
)  # fmt: skip
def test_targets_checked_against_the_whole_vocabulary(
    one_rank_group: None, target: torch.Tensor, match: str
) -> None:
    with pytest.raises(IndexError, match=match):
        vocab_parallel_cross_entropy(torch.zeros(2, 7), target)


def test_probability_target_gradients_are_refused(one_rank_group: None) -> None:
    p = torch.full((2, 3), 1 / 3, requires_grad=True)
    with pytest.raises(NotImplementedError, match="detach them"):
        vocab_parallel_cross_entropy(torch.zeros(2, 3, requires_grad=True), p)


@pytest.mark.parametrize(
    "kw,error,match",
    [(dict(vocab_start=0), ValueError, "both vocab_start and vocab_size"),
     (dict(vocab_start=2, vocab_size=7), ValueError, "do not fit in vocab_size=7"),
     (dict(vocab_start=-1, vocab_size=7), ValueError, "vocab_start=-1"),
     (dict(vocab_start=0.0, vocab_size=7), TypeError, "vocab_start must be an int")],
)  # fmt: skip
def test_slice_offsets_checked(one_rank_group: None, kw: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        vocab_parallel_cross_entropy(torch.zeros(2, 7), torch.tensor([0, 1]), **kw)


def test_linear_head_dtypes_as_torchs_linear(one_rank_group: None) -> None:
    # input, weight shard and bias of one dtype, with the errors of torch's linear layer
    x, w, t = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 4])
    with pytest.raises(RuntimeError, match="same dtype"):
        F.linear(x, w.double())
    with pytest.raises(RuntimeError, match="same dtype"):
        vocab_parallel_linear_cross_entropy(x, w.double(), t)
    with pytest.raises(RuntimeError, match="bias"):
        vocab_parallel_linear_cross_entropy(x, w, t, bias_shard=torch.zeros(5, dtype=torch.half))


def test_weight_must_cover_the_whole_vocabulary(one_rank_group: None) -> None:
    with pytest.raises(RuntimeError, match="weight tensor should be defined"):
        vocab_parallel_cross_entropy(torch.zeros(2, 7), torch.tensor([0, 1]), torch.ones(6))


# A torch.func transform would recompute the call with torch's operations on this rank's slice
# alone, and a compiled graph cannot hold the exchange between ranks: both refuse, loudly.
def test_transforms_and_compile_refuse_the_vocabulary_split(one_rank_group: None) -> None:
    x = torch.randn(3, 5, dtype=torch.float64)
    t = torch.tensor([0, 1, 2])

    def loss(x: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(x, t, vocab_start=0, vocab_size=5)

    with pytest.raises(NotImplementedError, match="torch.func"):
        torch.func.grad(loss)(x)
    with pytest.raises(NotImplementedError, match="torch.func"):
        torch.func.vmap(loss)(x.unsqueeze(0))
    with pytest.raises(Exception, match="cannot run under torch.compile"):
        torch.compile(loss, fullgraph=True)(x)
