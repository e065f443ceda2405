"""Triton kernels for CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``).

Cross entropy with class-index targets runs :func:`._ce.ce_index_kernel`, one program per row:
weights, ``ignore_index``, label smoothing, ``z_loss``, temperature and per-row or global
gradient scales, the gradient written in the forward pass. The other primitives, and soft-capped
logits, are the portable torch backend's (composed by :mod:`crossent.dispatch`).
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from ..base import Backend, RowOptions, RowStats, Unsupported, acc_dtype, no_classes
from ._ce import ce_index_kernel


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``)."""
    return bool(triton.knobs.runtime.interpret)


def _check_device(*tensors: Tensor | None) -> None:
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cuda" and not (t.device.type == "cpu" and interpreting()):
            raise RuntimeError(
                f"backend 'triton' runs on CUDA tensors (CPU tensors only under "
                f"TRITON_INTERPRET=1), got a tensor on {t.device}"
            )


def _block(v: int, itemsize: int) -> tuple[int, int]:
    """Columns per step of a row's loop, and warps per program."""
    block = min(triton.next_power_of_2(max(v, 1)), 16384 // itemsize)
    return block, 4 if block <= 1024 else 8 if block <= 2048 else 16


class TritonBackend(Backend):
    """Triton row kernels; :mod:`crossent.dispatch` gives the primitives without one the
    portable torch ones."""

    name = "triton"
    defers = {"cross_entropy_forward": "soft-capped logits"}  # noqa: RUF012

    def cross_entropy_forward(
        self,
        x: Tensor,
        target: Tensor,
        weight: Tensor | None,
        opts: RowOptions,
        grad_out: Tensor | None = None,
        grad_scale: Tensor | None = None,
    ) -> RowStats:
        _check_device(x, target, weight, grad_out, grad_scale)
        m, v = x.shape
        if opts.softcap is not None:  # tanh has no interpreter-checked Triton form here
            raise Unsupported
        acc = acc_dtype(x.dtype)
        if v == 0:
            return no_classes(m, acc, x.device)
        loss = torch.empty(m, dtype=acc, device=x.device)
        lse = torch.empty(m, dtype=acc, device=x.device)
        if m == 0:
            return RowStats(loss, lse)
        x = x if x.stride(1) == 1 else x.contiguous()
        target = target.contiguous()
        w = None if weight is None else weight.to(acc).contiguous()
        # ε, λ, 1/T, Σ w: a tensor in the accumulation dtype (no host synchronisation for Σ w)
        params = torch.tensor(
            [opts.label_smoothing, opts.z_loss, 1.0 / opts.temperature, float(v)],
            dtype=acc, device=x.device,
        )
        if w is not None:
            params[3] = w.sum(dtype=acc)
        out = grad_out
        if grad_out is not None and grad_out.stride(1) != 1:
            out = torch.empty(m, v, dtype=grad_out.dtype, device=x.device)
        scale = grad_scale.to(acc).contiguous() if grad_scale is not None else None
        block, warps = _block(v, x.element_size())
        ce_index_kernel[(m,)](
            x, x.stride(0), target, params if w is None else w,
            x if out is None else out, 0 if out is None else out.stride(0),
            loss if scale is None else scale, loss, lse, v, opts.ignore_index, params,
            HAS_W=w is not None, SMOOTH=opts.label_smoothing > 0.0, ZLOSS=opts.z_loss != 0.0,
            TEMP=opts.temperature != 1.0, WANT_GRAD=out is not None,
            HAS_SCALE=scale is not None, ROW_SCALE=scale is not None and scale.dim() > 0,
            ACC=triton.language.float64 if acc == torch.float64 else triton.language.float32,
            BLOCK=block, num_warps=warps,
        )  # fmt: skip
        if out is not None and out is not grad_out:
            assert grad_out is not None
            grad_out.copy_(out)
        return RowStats(loss, lse)
