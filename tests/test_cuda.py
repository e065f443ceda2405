"""CUDA tensors: ``backend="auto"`` hands every call torch's own function can compute to it
there, and runs crossent's options and the linear head on the portable ``torch`` backend, with
torch's results; the triton backend compiled for the GPU is checked by ``triton_check.py``.

Skipped on machines without a CUDA device. The same parity rule as everywhere
(:mod:`tests.parity`), on GPU tensors: outputs, warnings and gradients against
``torch.nn.functional``; the fused linear cross entropy against the matmul followed by
``F.cross_entropy`` (torch builds older than 2.13 have no ``F.linear_cross_entropy``).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from parity import check_same

import crossent
from crossent import dispatch, testing

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

CUDA = torch.device("cuda")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _logits(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return testing.make_logits(shape, dtype, seed).to(CUDA)


def test_auto_takes_the_torch_backend_on_cuda_tensors() -> None:
    x = _logits((4, 7), torch.float32)
    assert dispatch.resolve("auto", x).name == "torch"
    with pytest.raises(Exception, match="cpu|CPU"):
        crossent.cross_entropy(x, torch.zeros(4, dtype=torch.long, device=CUDA), backend="cpu")


# Every reduction, class weights, ignore_index and label smoothing, in the three float dtypes
# and at a real vocabulary size (32000: the kernels' block boundaries do not matter here, the
# torch backend's chunking does).
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "kw",
    [{}, {"ignore_index": 3, "label_smoothing": 0.1}, {"weight": True}],
    ids=["plain", "ignore-smoothing", "weight"],
)
@pytest.mark.parametrize("v", [10, 32000])
def test_cross_entropy_index_targets(
    dtype: torch.dtype, reduction: str, kw: dict[str, Any], v: int
) -> None:
    kw = dict(kw)
    x = _logits((64, v), dtype)
    t = testing.make_targets((64,), v).to(CUDA)
    t[::5] = 3
    if kw.pop("weight", False):
        kw["weight"] = testing.make_weight(v, dtype).to(CUDA)
    if dtype == torch.float16 and kw.get("label_smoothing") and v == 32000:
        # torch's CUDA kernel sums the smoothing term over the 32000 classes in float16 and
        # returns inf (torch 2.11): "auto" hands the call to it; the portable backend's loss is
        # the finite float64 value, rounded
        ours = crossent.cross_entropy(x, t, reduction=reduction, **kw, backend="torch")
        exact = F.cross_entropy(x.double(), t, reduction=reduction, **kw)
        assert bool(torch.isfinite(ours).all())
        testing.assert_close_to_oracle(ours, exact, dtype=dtype, what="loss")
    check_same("cross_entropy", x, t, reduction=reduction, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_entropy_probability_targets_and_k_dims(dtype: torch.dtype) -> None:
    x = _logits((8, 33), dtype)
    p = testing.make_probs((8, 33), dtype).to(CUDA)
    check_same("cross_entropy", x, p, label_smoothing=0.2)
    xk = _logits((3, 11, 4, 5), dtype)
    tk = testing.make_targets((3, 4, 5), 11).to(CUDA)
    check_same("cross_entropy", xk, tk, reduction="none")
    check_same("nll_loss", F.log_softmax(xk.float(), 1).to(dtype), tk)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
def test_softmax_families(dtype: torch.dtype, fn: str) -> None:
    check_same(fn, _logits((16, 1031), dtype), 1)
    check_same(fn, _logits((5, 7, 3), dtype), 0)


# On CUDA the target range is checked by a device-side assertion (no host synchronisation):
# it leaves the process's CUDA context unusable, as torch's own does, so it runs in a child.
@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_bad_targets_stop_the_device(backend: str) -> None:
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton not installed")
    code = (
        "import torch, crossent\n"
        "x = torch.zeros(4, 7, device='cuda')\n"
        "bad = torch.tensor([0, 1, 7, 2], device='cuda')\n"
        f"loss = crossent.cross_entropy(x, bad, backend={backend!r}, label_smoothing=0.1)\n"
        "torch.cuda.synchronize()\n"
        "print(float(loss))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode != 0, done.stdout
    assert "device-side assert" in done.stderr or "Target out of bounds" in done.stderr


# linear_cross_entropy on GPU: index targets with ignored rows, bias, class weights and
# smoothing, small chunks (several per call), float32 and bfloat16; loss and all three
# gradients within the tolerance rule of a float64 oracle, torch's own matmul +
# F.cross_entropy in the input dtype giving the reference error. The oracle's logits: exact in
# float32 (cuBLAS rounds a chunk's products differently from the whole batch's, by an ulp, and
# neither rounding is the definition), torch's rounded ones in bfloat16 (there that rounding
# dominates both errors: see check_half in test_linear_cross_entropy.py).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy(dtype: torch.dtype, reduction: str) -> None:
    n, d, v = 48, 32, 1000
    x = _logits((n, d), dtype)
    w = (testing.make_logits((v, d), torch.float64, 1) / d**0.5).to(dtype).to(CUDA)
    b = _logits((v,), dtype, 2)
    t = testing.make_targets((n,), v).to(CUDA)
    t[::4] = -100
    cw = testing.make_weight(v, dtype).to(CUDA)
    gen = torch.Generator().manual_seed(5)
    g = (torch.rand(n if reduction == "none" else (), generator=gen) + 0.5).to(dtype).to(CUDA)
    kw: dict[str, Any] = {"reduction": reduction, "label_smoothing": 0.1}
    results = []
    for lib in ("crossent", "torch"):
        xs, ws, bs = (a.detach().clone().requires_grad_() for a in (x, w, b))
        if lib == "crossent":
            out = crossent.linear_cross_entropy(
                xs, ws, t, linear_bias=bs, weight=cw, chunk_bytes=7 * v * 4, **kw
            )
        else:
            out = F.cross_entropy(F.linear(xs, ws, bs), t, weight=cw, **kw)
        out.backward(g)
        results.append((out, xs.grad, ws.grad, bs.grad))
    if dtype == torch.float32:
        logits = F.linear(x.double(), w.double(), b.double()).requires_grad_()
    else:
        logits = F.linear(x, w, b).double().requires_grad_()
    loss = F.cross_entropy(logits, t, weight=cw.double(), **kw)
    loss.backward(g.double())
    gl = logits.grad
    assert gl is not None
    oracle = (loss.detach(), gl @ w.double(), gl.t() @ x.double(), gl.sum(0))
    names = ("loss", "d input", "d weight", "d bias")
    for ours, theirs, exact, what in zip(*results, oracle, names, strict=True):
        assert ours.dtype == theirs.dtype == dtype, what
        testing.assert_close_to_oracle(ours, exact, theirs, what=what)


def test_token_stats_match_the_cpu_kernels() -> None:
    x = testing.make_logits((32, 500), torch.float32, 4)
    t = testing.make_targets((32,), 500)
    on_gpu = crossent.token_stats(x.to(CUDA), t.to(CUDA))
    on_cpu = crossent.token_stats(x, t)
    for a, e in zip(on_gpu, on_cpu, strict=True):
        torch.testing.assert_close(a.cpu(), e)


# The triton backend compiled for the GPU (the rest of the suite runs its kernels in Triton's
# interpreter): a fresh process without TRITON_INTERPRET, real vocabularies, every option.
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernels_compiled_for_the_gpu() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    script = Path(__file__).with_name("triton_check.py")
    done = subprocess.run([sys.executable, str(script), "cuda"], env=env, capture_output=True,
                          text=True, timeout=1800)  # fmt: skip
    assert done.returncode == 0, done.stdout[-20000:] + done.stderr[-5000:]
    assert done.stdout.rstrip().endswith("0 failed")
