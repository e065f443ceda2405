"""Adaptor exposing the NumPy float64 oracle (:mod:`crossent.reference`) as a backend.

Slow by design: tensors go to the host, the oracle computes in float64, and results come back
in the dtypes the other backends return. Its use is checking, not training.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import reference as ref
from .base import Backend, RowOptions, RowStats, acc_dtype, prob_acc_dtype
from .torch import no_classes


def _np(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64 if t.dtype.is_floating_point else torch.int64).numpy()


def _np_opt(t: Tensor | None) -> np.ndarray | None:
    return None if t is None else _np(t)


def _back(a: np.ndarray, like: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.tensor(a, dtype=torch.float64).to(device=like.device, dtype=dtype)


def _scale(grad_scale: Tensor) -> float | np.ndarray:
    """A 0-d scale as a float, per-row scales as an ``(M, 1)`` column."""
    if grad_scale.dim() == 0:
        return float(grad_scale)
    return _np(grad_scale).reshape(-1, 1)


def _extensions(opts: RowOptions) -> dict[str, Any]:
    return {"z_loss": opts.z_loss, "softcap": opts.softcap, "temperature": opts.temperature}


def _u(x: np.ndarray, opts: RowOptions) -> np.ndarray:
    """The logits as the loss reads them (for the lse the primitives report)."""
    if opts.softcap is not None:
        x = opts.softcap * np.tanh(x / opts.softcap)
    return x / opts.temperature if opts.temperature != 1.0 else x


def _lse(x: np.ndarray) -> np.ndarray:
    # log Σ exp(x) per row, from the oracle's own log_softmax: lse = x - log_softmax(x)
    if x.shape[1] == 0:
        return np.full(x.shape[0], -np.inf)
    with np.errstate(invalid="ignore"):
        return (x - ref.log_softmax(x, 1))[:, 0]


class ReferenceBackend(Backend):
    """Every primitive evaluated by the float64 oracle."""

    name = "reference"

    def softmax_forward(self, x: Tensor, log: bool) -> Tensor:
        out = (ref.log_softmax if log else ref.softmax)(_np(x), 1)
        return _back(out, x, x.dtype)

    def softmax_backward(self, grad: Tensor, out: Tensor, log: bool) -> Tensor:
        # The oracle differentiates from the input; recover an input with the same output.
        o = _np(out)
        fn = ref.log_softmax_grad if log else ref.softmax_grad
        with np.errstate(divide="ignore"):
            x = o if log else np.log(o)  # an underflowed p = 0 becomes -inf: still p = 0
            return _back(fn(x, 1, _np(grad)), grad, out.dtype)

    def cross_entropy_forward(
        self,
        x: Tensor,
        target: Tensor,
        weight: Tensor | None,
        opts: RowOptions,
        grad_out: Tensor | None = None,
        grad_scale: Tensor | None = None,
    ) -> RowStats:
        acc = acc_dtype(x.dtype)
        if x.shape[1] == 0:  # no classes: every row is ignored (targets were range-checked)
            return no_classes(x.shape[0], acc, x.device)
        xn, tn, wn = _np(x), _np(target), _np_opt(weight)
        ii, eps = opts.ignore_index, opts.label_smoothing
        ext = _extensions(opts)
        loss = ref.cross_entropy(xn, tn, wn, ii, "none", eps, **ext)
        if grad_out is not None:
            ones = np.ones(x.shape[0])
            g = ref.cross_entropy_grad(xn, tn, ones, wn, ii, "none", eps, **ext).input
            scale = 1.0 if grad_scale is None else _scale(grad_scale)
            keep = (tn != opts.ignore_index)[:, None]
            with np.errstate(invalid="ignore"):
                # ignored rows are exactly 0, even when all -inf (the oracle, like torch,
                # gives NaN there: see the README's deliberate differences)
                g = np.where(keep, g * scale, 0.0)
            grad_out.copy_(_back(g, x, grad_out.dtype))
        return RowStats(_back(loss, x, acc), _back(_lse(_u(xn, opts)), x, acc))

    def cross_entropy_prob_forward(
        self,
        x: Tensor,
        target: Tensor,
        weight: Tensor | None,
        opts: RowOptions,
        grad_out: Tensor | None = None,
        grad_scale: Tensor | None = None,
    ) -> RowStats:
        acc = prob_acc_dtype(x, target, weight)
        if x.shape[1] == 0:
            return no_classes(x.shape[0], acc, x.device)
        xn, tn, wn = _np(x), _np(target), _np_opt(weight)
        eps = opts.label_smoothing
        ext = _extensions(opts)
        loss = ref.cross_entropy(xn, tn, wn, -100, "none", eps, **ext)
        if grad_out is not None:
            ones = np.ones(x.shape[0])
            g = ref.cross_entropy_grad(xn, tn, ones, wn, -100, "none", eps, **ext).input
            if grad_scale is not None:
                g = g * _scale(grad_scale)
            grad_out.copy_(_back(g, x, grad_out.dtype))
        return RowStats(_back(loss, x, acc), _back(_lse(_u(xn, opts)), x, acc))

    def cross_entropy_prob_extra_grads(
        self,
        x: Tensor,
        target: Tensor,
        weight: Tensor | None,
        lse: Tensor,
        row_grad: Tensor,
        opts: RowOptions,
        want_target: bool,
        want_weight: bool,
    ) -> tuple[Tensor | None, Tensor | None]:
        grads = ref.cross_entropy_grad(
            _np(x), _np(target), _np(row_grad), _np_opt(weight), -100, "none",
            opts.label_smoothing, **_extensions(opts),
        )
        dt = None
        if want_target and grads.target is not None:
            dt = _back(grads.target, target, target.dtype)
        dw = None
        if want_weight and weight is not None and grads.weight is not None:
            dw = _back(grads.weight, weight, weight.dtype)
        return dt, dw

    def nll_forward(
        self, x: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int
    ) -> Tensor:
        loss = ref.nll_loss(_np(x), _np(target), _np_opt(weight), ignore_index, reduction="none")
        return _back(loss, x, acc_dtype(x.dtype))

    def nll_backward(
        self,
        row_grad: Tensor,
        target: Tensor,
        weight: Tensor | None,
        ignore_index: int,
        num_classes: int,
        dtype: torch.dtype,
    ) -> Tensor:
        m = target.shape[0]
        rg = np.broadcast_to(_np(row_grad), (m,))
        x = np.zeros((m, num_classes))
        grad = ref.nll_loss_grad(x, _np(target), rg, _np_opt(weight), ignore_index, "none")
        return _back(grad, target, dtype)
