"""The triton backend's own checks; its parity with torch runs in the backend-parametrised
suites (in Triton's interpreter where no GPU is present)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import crossent
from crossent import dispatch

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton not installed")  # fmt: skip


@needs_triton
def test_the_gpu_check_script_runs_interpreted() -> None:
    # tests/triton_check.py is what test_cuda.py runs compiled on a GPU; here its CPU mode, in
    # the interpreter, so the script itself is known to work before a GPU runs it
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    script = Path(__file__).with_name("triton_check.py")
    done = subprocess.run([sys.executable, "-W", "ignore", str(script), "cpu"], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-20000:] + done.stderr[-5000:]
    lines = done.stdout.splitlines()
    assert lines[-1] == "0 failed" and sum(line.startswith("PASS") for line in lines) == 96


@needs_triton
def test_the_kernels_compile_for_an_h100_without_spilling() -> None:
    # tests/triton_aot.py compiles the kernels for sm_90a with Triton and the ptxas its wheel
    # ships (no GPU needed): in the layouts the backend picks, options off and all on, no
    # kernel may spill registers; here its quick subset (the whole matrix by hand)
    script = Path(__file__).with_name("triton_aot.py")
    done = subprocess.run([sys.executable, "-W", "ignore", str(script), "quick"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    if "no ptxas under" in done.stdout + done.stderr:
        pytest.skip("this Triton wheel ships no ptxas")
    assert done.returncode == 0, done.stdout[-20000:] + done.stderr[-5000:]
    lines = done.stdout.splitlines()
    assert lines[-1] == "0 failed" and sum(line.startswith("PASS") for line in lines) == 25


@needs_triton
def test_auto_does_not_pick_triton() -> None:
    x = torch.zeros(2, 3)
    assert dispatch.resolve("auto", x).name != "triton"
    assert "triton" in dispatch.available()  # the tests run its kernels interpreted


@needs_triton
def test_cpu_tensors_need_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("with a CUDA device the backend is available; the kernel's device check "
                    "is what refuses CPU tensors")
    assert "triton" not in dispatch.available()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        crossent.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]), backend="triton")


# ---- the kernels' two layouts, and the GPU path's promises, checked in the interpreter ------


@pytest.fixture(params=["one-tile", "loop", "split"])
def layout(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The kernels' tile layout: whole rows held in one tile (several rows per program), the
    column loop of long rows (forced here on short rows, in blocks of 4 columns), or long rows
    split into slices read by programs of their own and merged (forced here as on a device
    running 64 programs at once)."""
    pytest.importorskip("triton")
    from crossent.backends.triton import _common

    if request.param in ("loop", "split"):
        monkeypatch.setattr(_common, "ONE_TILE_MAX", 0)
        monkeypatch.setattr(_common, "SOFTMAX_ONE_TILE_MAX", 0)
        monkeypatch.setattr(_common, "LOOP_BLOCK_BYTES", 16)
    if request.param == "split":
        monkeypatch.setattr(_common, "SPLIT_PROGRAMS", 64)
    return str(request.param)


def _pair(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    """``fn`` on the triton and the portable torch backend: values and the first argument's
    gradient."""
    out = []
    for backend in ("triton", "torch"):
        leaves = [a.detach().clone().requires_grad_(i == 0) for i, a in enumerate(args)]
        y = fn(*leaves, **kwargs, backend=backend)
        g = torch.linspace(-1.0, 1.0, y.numel(), dtype=y.dtype).reshape(y.shape)
        y.backward(g)
        out.append([y.detach()] + [a.grad for a in leaves if a.grad is not None])
    return out


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "kw",
    [{}, {"label_smoothing": 0.2, "weighted": True, "ignore_index": 2},
     {"softcap": 3.0, "temperature": 0.7, "z_loss": 1e-2, "label_smoothing": 0.1},
     {"reduction": "none", "weighted": True}],
    ids=["plain", "weights+smoothing+ignore", "softcap+temperature+z", "none"],
)  # fmt: skip
def test_kernels_in_both_layouts(layout: str, dtype: torch.dtype, kw: dict) -> None:
    # rows of 37 classes: 10 blocks of 4 in the loop layout (a partial last one), 4 rows of 64
    # columns per program in the one-tile layout (a partial last program)
    kw = dict(kw)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(13, 37, generator=gen, dtype=torch.float64) * 3).to(dtype)
    x[4, 10:20] = -torch.inf
    t = torch.randint(0, 37, (13,), generator=gen)
    t[[1, 7]] = 2  # ignored where ignore_index is 2
    w = torch.rand(37, generator=gen, dtype=torch.float64).to(dtype) + 0.5
    if not kw.pop("weighted", False):
        w = None
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    p = torch.softmax(torch.randn(13, 37, generator=gen, dtype=torch.float64), 1).to(dtype)
    cases = [
        (crossent.cross_entropy, (x, t) if w is None else (x, t, w), kw),
        (crossent.cross_entropy, (x, p) if w is None else (x, p, w),
         {k: v for k, v in kw.items() if k != "ignore_index"}),
        # a view: rows 37 apart holding 31 classes from the third on (the gradient buffer's
        # rows 31 apart: blocks not aligned alike), and ignore_index / targets within them
        (crossent.cross_entropy, (x[:, 2:33], t.clamp(max=30)) if w is None
         else (x[:, 2:33], t.clamp(max=30), w[2:33]), kw),
        (crossent.softmax, (x[:, :30].clamp(min=-50),), {"dim": 1}),
        (crossent.log_softmax, (x[:, :30].clamp(min=-50),), {"dim": 1}),
    ]  # fmt: skip
    for fn, args, kws in cases:
        ours, theirs = _pair(fn, *args, **kws)
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=rtol, atol=rtol, equal_nan=True)
    # the gradient written over the logits themselves (same rows, same alignment)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    losses = [crossent.cross_entropy(xi.clone(), t, w, **kw, backend=b, inplace_backward=True)
              for xi, b in zip(xs, ("triton", "torch"), strict=True)]  # fmt: skip
    for loss in losses:
        loss.backward(torch.ones_like(loss))
    torch.testing.assert_close(losses[0], losses[1], rtol=rtol, atol=rtol, equal_nan=True)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=rtol, atol=rtol, equal_nan=True)


@needs_triton
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_partials_in_both_layouts(layout: str, prob: bool) -> None:
    from crossent.backends.base import RowOptions, merge_index, merge_prob

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, 41, generator=gen, dtype=torch.float64) * 3
    x[3, 20:] = -torch.inf
    t = torch.randint(0, 41, (9,), generator=gen)
    t[5] = -100
    p = torch.softmax(torch.randn(9, 41, generator=gen, dtype=torch.float64), 1)
    w = torch.rand(41, generator=gen, dtype=torch.float64) + 0.5
    opts = RowOptions(label_smoothing=0.1, z_loss=1e-2, softcap=4.0, temperature=0.8)
    scale = torch.rand(9, generator=gen, dtype=torch.float64)
    grads = {}
    for name in ("triton", "torch"):
        be = dispatch.resolve(name, x)
        bounds = [(0, 17), (17, 41)]
        if prob:
            parts = torch.stack([
                be.cross_entropy_prob_partial(x[:, a:b], p[:, a:b], w, opts, a, 41)
                for a, b in bounds
            ])  # fmt: skip
            merged = merge_prob(parts, opts)
        else:
            parts = torch.stack([be.cross_entropy_partial(x[:, a:b], t, w, opts, a, 41)
                                 for a, b in bounds])  # fmt: skip
            merged = merge_index(parts, t, w, opts, 41)
        g = torch.empty_like(x)
        for a, b in bounds:
            if prob:
                be.cross_entropy_prob_partial_grad(x[:, a:b], p[:, a:b], w, opts, a, 41,
                                                   merged, g[:, a:b], scale)  # fmt: skip
            else:
                be.cross_entropy_partial_grad(x[:, a:b], t, w, opts, a, 41, merged, g[:, a:b],
                                              scale)  # fmt: skip
        grads[name] = (parts, merged.loss, g)
    for a, b in zip(grads["triton"], grads["torch"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, equal_nan=True)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_the_device_scale(dtype: torch.dtype) -> None:
    # the backward's in-place scale by a factor held on the device: torch's t *= g, bit for
    # bit, and t itself returned (g = 1 leaves it as it is, without a pass on a GPU)
    be = dispatch.resolve("triton", torch.zeros(1))
    t = torch.randn(3, 5000, dtype=torch.float64).to(dtype)
    for g in (0.75, 1.0, -3.1):
        gt = torch.tensor(g, dtype=dtype)
        want = t * gt
        got = t.clone()
        assert be.scale_(got, gt) is got
        assert torch.equal(got, want)


@needs_triton
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_the_gpu_path_reads_no_value_on_the_host(
    monkeypatch: pytest.MonkeyPatch, prob: bool, reduction: str
) -> None:
    # What runs on a CUDA tensor, run here on CPU tensors in the interpreter with every host
    # read of a tensor's value made an error: the range check becomes the device-side
    # assertion, the backward's comparison of its incoming gradient with 1 the device's (what
    # a CUDA-graph capture and an asynchronous training step need)
    from crossent import _args

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(12, 9, generator=gen)
    t = torch.randint(0, 9, (12,), generator=gen)
    t[3] = -100
    target = torch.softmax(torch.randn(12, 9, generator=gen), 1) if prob else t
    w = torch.rand(9, generator=gen) + 0.5
    kw = {"reduction": reduction, "label_smoothing": 0.1}
    g = torch.tensor(1.0) if reduction == "mean" else torch.tensor(0.75)
    if reduction == "none":
        g = torch.rand(12, generator=gen)
    want_x = x.clone().requires_grad_()
    want = torch.nn.functional.cross_entropy(want_x, target, w, **kw)
    want.backward(g)

    def no_read(*args: object, **kwargs: object) -> None:
        raise AssertionError("a tensor's value was read on the host")

    monkeypatch.setattr(_args, "host_readable", lambda t: False)
    got_x = x.clone().requires_grad_()
    with monkeypatch.context() as m:
        for name in ("__bool__", "item", "tolist", "__int__", "__float__", "__index__"):
            m.setattr(torch.Tensor, name, no_read)
        got = crossent.cross_entropy(got_x, target, w, **kw, backend="triton")
        got.backward(g)
        y = crossent.log_softmax(got_x.detach().requires_grad_(), 1, backend="triton")
        y.backward(torch.ones_like(y))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_x.grad, want_x.grad)
    bad = t.clone()
    bad[5] = 9
    with pytest.raises(RuntimeError, match=r"Target out of bounds: targets must lie in \[0, 9\)"):
        crossent.cross_entropy(x, bad, backend="triton")
