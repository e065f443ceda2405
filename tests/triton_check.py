"""The triton backend's cross entropy against the float64 oracle (torch's own error as the
yardstick): ``python triton_check.py cuda`` compiles the kernels for the GPU (run with
``TRITON_INTERPRET=0``); ``python triton_check.py cpu`` runs the same cases in Triton's
interpreter (``TRITON_INTERPRET=1``, small shapes only). Prints one line per case and exits 1
when any fails."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import crossent
from crossent import reference, testing


def main(device: str) -> int:
    dev = torch.device(device)
    vocabs = [10, 4099, 32000, 128256] if dev.type == "cuda" else [10, 4099]
    rows = 64 if dev.type == "cuda" else 6
    options = [
        {}, {"label_smoothing": 0.1, "ignore_index": 3}, {"weight": True},
        {"weight": True, "label_smoothing": 0.2, "reduction": "none"}, {"reduction": "sum"},
        {"z_loss": 1e-3, "temperature": 0.8},
    ]  # fmt: skip
    failures = 0
    for v in vocabs:
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            for i, opt in enumerate(options):
                kw = dict(opt)
                x = testing.make_logits((rows, v), dtype, seed=i)
                t = testing.make_targets((rows,), v, seed=i)
                t[::5] = kw.get("ignore_index", -100)
                w = testing.make_weight(v, dtype) if kw.pop("weight", False) else None
                ext = {k: kw.pop(k) for k in ("z_loss", "temperature") if k in kw}
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
                xn = x.double().numpy()
                wn = None if w is None else w.double().numpy()
                okw = dict(weight=wn, **kw, **ext)
                gn = g.double().numpy()
                label = f"V={v} {str(dtype)[6:]} {opt}"
                try:
                    testing.assert_close_to_oracle(
                        loss.detach().cpu(), reference.cross_entropy(xn, t.numpy(), **okw),
                        theirs, dtype=dtype, what="loss",
                    )
                    testing.assert_close_to_oracle(
                        xd.grad.cpu(),
                        reference.cross_entropy_grad(xn, t.numpy(), gn, **okw).input,
                        theirs_grad, what="d input",
                    )
                    print(f"PASS {label}")
                except AssertionError as exc:
                    failures += 1
                    print(f"FAIL {label}: {exc}")
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "cuda"))
