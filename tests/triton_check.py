"""The triton backend against the float64 oracle (torch's own error as the yardstick), and on a
GPU the promises of its CUDA path.

``python triton_check.py cuda`` compiles the kernels for the GPU (run with
``TRITON_INTERPRET=0``): cross entropy with class-index and probability targets (every option,
soft-capping included), softmax and log_softmax, at vocabularies that take every kernel layout
(several rows per program, a whole row in one tile, the column loop; sizes that are not a
multiple of 16), then a call with CUDA's synchronisation debugging set to raise, and a
forward+backward captured in a CUDA graph and replayed on new data. ``python triton_check.py
cpu`` runs the oracle cases in Triton's interpreter (``TRITON_INTERPRET=1``, small shapes only).
Prints one line per case and exits 1 when any fails.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import crossent
from crossent import reference, testing

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_OPTIONS = [
    {}, {"label_smoothing": 0.1, "ignore_index": 3}, {"weight": True},
    {"weight": True, "label_smoothing": 0.2, "reduction": "none"}, {"reduction": "sum"},
    {"z_loss": 1e-3, "temperature": 0.8}, {"softcap": 30.0, "label_smoothing": 0.1},
]  # fmt: skip
PROB_OPTIONS = [{}, {"weight": True, "label_smoothing": 0.1}, {"softcap": 20.0, "z_loss": 1e-3}]
EXTENSIONS = ("z_loss", "temperature", "softcap")


def _cross_entropy_case(dev: torch.device, rows: int, v: int, dtype: torch.dtype, seed: int,
                        opt: dict[str, Any], prob: bool) -> None:  # fmt: skip
    kw = dict(opt)
    x = testing.make_logits((rows, v), dtype, seed=seed)
    if prob:
        t = testing.make_probs((rows, v), dtype, seed=seed)
    else:
        t = testing.make_targets((rows,), v, seed=seed)
        t[::5] = kw.get("ignore_index", -100)
    w = testing.make_weight(v, dtype) if kw.pop("weight", False) else None
    ext = {k: kw.pop(k) for k in EXTENSIONS if k in kw}
    xd = x.to(dev, copy=True).requires_grad_()
    wd = None if w is None else w.to(dev)
    loss = crossent.cross_entropy(xd, t.to(dev), wd, backend="triton", **kw, **ext)
    g = testing.make_logits(tuple(loss.shape), loss.dtype, seed=99, scale=1.0)
    loss.backward(g.to(dev))
    theirs = theirs_grad = None
    if not ext:
        xt = x.to(dev, copy=True).requires_grad_()
        tl = F.cross_entropy(xt, t.to(dev), wd, **kw)
        tl.backward(g.to(dev))
        theirs, theirs_grad = tl.detach().cpu(), xt.grad.cpu()
    xn, tn = x.double().numpy(), t.double().numpy() if prob else t.numpy()
    okw = dict(weight=None if w is None else w.double().numpy(), **kw, **ext)
    testing.assert_close_to_oracle(loss.detach().cpu(), reference.cross_entropy(xn, tn, **okw),
                                   theirs, dtype=dtype, what="loss")  # fmt: skip
    want = reference.cross_entropy_grad(xn, tn, g.double().numpy(), **okw).input
    testing.assert_close_to_oracle(xd.grad.cpu(), want, theirs_grad, what="d input")


def _softmax_case(dev: torch.device, rows: int, v: int, dtype: torch.dtype, log: bool) -> None:
    x = testing.make_logits((rows, v), dtype, seed=5)
    g = testing.make_logits((rows, v), dtype, seed=6, scale=1.0)
    fn, tfn = (crossent.log_softmax, F.log_softmax) if log else (crossent.softmax, F.softmax)
    xd = x.to(dev, copy=True).requires_grad_()
    y = fn(xd, 1, backend="triton")
    y.backward(g.to(dev))
    xt = x.to(dev, copy=True).requires_grad_()
    yt = tfn(xt, 1)
    yt.backward(g.to(dev))
    xn = x.double().numpy()
    ref_y = reference.log_softmax(xn, 1) if log else reference.softmax(xn, 1)
    ref_g = (reference.log_softmax_grad if log else reference.softmax_grad)(
        xn, 1, g.double().numpy()
    )
    testing.assert_close_to_oracle(y.detach().cpu(), ref_y, yt.detach().cpu(), dtype=dtype,
                                   what="output")  # fmt: skip
    testing.assert_close_to_oracle(xd.grad.cpu(), ref_g, xt.grad.cpu(), what="d input")


def _no_synchronisation(dev: torch.device) -> None:
    """Forward+backward of every reduction with CUDA's synchronisation debugging raising."""
    x = testing.make_logits((64, 32000), torch.bfloat16).to(dev).requires_grad_()
    t = testing.make_targets((64,), 32000).to(dev)
    t[::7] = -100
    w = testing.make_weight(32000, torch.bfloat16).to(dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for reduction in ("mean", "sum", "none"):
            loss = crossent.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1,
                                          backend="triton")  # fmt: skip
            loss.backward(torch.ones_like(loss))
            x.grad = None
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _cuda_graph(dev: torch.device) -> None:
    """One forward+backward captured in a CUDA graph, replayed on new logits and targets:
    loss and gradient equal to eager torch's on the new data."""
    n, v = 256, 32000
    x = torch.zeros(n, v, device=dev, dtype=torch.bfloat16, requires_grad=True)
    t = torch.zeros(n, dtype=torch.long, device=dev)

    def step() -> torch.Tensor:
        return crossent.cross_entropy(x, t, label_smoothing=0.1, backend="triton")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # compiles, allocates the pool's blocks
            step().backward()
            x.grad = None
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
        loss.backward()
    for seed in (1, 2):
        with torch.no_grad():
            x.copy_(testing.make_logits((n, v), torch.bfloat16, seed=seed).to(dev))
            t.copy_(testing.make_targets((n,), v, seed=seed).to(dev))
            t[::9] = -100
        graph.replay()
        xt = x.detach().clone().requires_grad_()
        want = F.cross_entropy(xt, t, label_smoothing=0.1)
        want.backward()
        torch.testing.assert_close(loss.detach(), want.detach(), rtol=2e-2, atol=1e-2)
        assert x.grad is not None
        torch.testing.assert_close(x.grad, xt.grad, rtol=2e-2, atol=1e-4)


def _run(label: str, case: Callable[[], None]) -> bool:
    try:
        case()
    except (AssertionError, RuntimeError) as exc:
        print(f"FAIL {label}: {exc}")
        return False
    print(f"PASS {label}")
    return True


def main(device: str) -> int:
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    vocabs = [10, 1000, 4099, 32000, 50257, 128256] if cuda else [10, 4099]
    rows = 64 if cuda else 6
    failures = 0
    for v in vocabs:
        for dtype in DTYPES:
            for i, opt in enumerate(INDEX_OPTIONS):
                ok = _run(f"index V={v} {str(dtype)[6:]} {opt}",
                          lambda: _cross_entropy_case(dev, rows, v, dtype, i, opt, False))  # noqa: B023  # fmt: skip
                failures += not ok
            for i, opt in enumerate(PROB_OPTIONS):
                ok = _run(f"prob V={v} {str(dtype)[6:]} {opt}",
                          lambda: _cross_entropy_case(dev, rows, v, dtype, i, opt, True))  # noqa: B023  # fmt: skip
                failures += not ok
            for log in (False, True):
                name = "log_softmax" if log else "softmax"
                ok = _run(f"{name} V={v} {str(dtype)[6:]}",
                          lambda: _softmax_case(dev, rows, v, dtype, log))  # noqa: B023  # fmt: skip
                failures += not ok
    if cuda:
        # few rows, long ones: the row loop's path when N is small
        for v in (128256, 262144):
            ok = _run(f"index N=2 V={v} bfloat16 smoothing",
                      lambda: _cross_entropy_case(dev, 2, v, torch.bfloat16, 0,  # noqa: B023
                                                  {"label_smoothing": 0.1}, False))  # fmt: skip
            failures += not ok
        failures += not _run("no host synchronisation", lambda: _no_synchronisation(dev))
        failures += not _run("CUDA graph capture and replay", lambda: _cuda_graph(dev))
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "cuda"))
