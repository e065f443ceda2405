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
from .base import (
    INDEX_PARTS,
    PROB_PARTS,
    Backend,
    Merged,
    RowOptions,
    RowStats,
    TokenRows,
    acc_dtype,
    no_classes,
    prob_acc_dtype,
)


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
    """The logits as the loss reads them: the oracle's transform."""
    return ref.logit_transform(x, opts.softcap, opts.temperature)[0]


def _lse(x: np.ndarray) -> np.ndarray:
    # log Σ exp(x) per row, from the oracle's own log_softmax: lse = x - log_softmax(x)
    if x.shape[1] == 0:
        return np.full(x.shape[0], -np.inf)
    with np.errstate(invalid="ignore"):
        return (x - ref.log_softmax(x, 1))[:, 0]


def _du(x: np.ndarray, opts: RowOptions) -> np.ndarray:
    """d u / d x of :func:`_u`."""
    return ref.logit_transform(x, opts.softcap, opts.temperature)[1]


def _slice(x: Tensor, opts: RowOptions, parts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A slice's logits as read and ``u - ref``; writes its max and Σ exp(u - ref) into
    ``parts`` (see backends/base.py)."""
    u = _u(_np(x), opts)
    with np.errstate(invalid="ignore"):
        mx = u.max(1)
        z = u - np.where(np.isfinite(mx), mx, 0.0)[:, None]
        parts[0], parts[1] = mx, np.exp(z).sum(1)
    return u, z


def _probs(x: Tensor, opts: RowOptions, merged: Merged) -> np.ndarray:
    return np.exp(_u(_np(x), opts) - _np(merged.lse)[:, None])


def _smoothed(
    target: Tensor, weight: Tensor | None, opts: RowOptions, start: int, total: int
) -> np.ndarray:
    """``w ⊙ t'`` over the slice's columns, ``t' = (1-ε)·t + ε/total``."""
    eps = opts.label_smoothing
    ts = (1.0 - eps) * _np(target) + eps / total
    return ts if weight is None else ts * _np(weight)[start : start + target.shape[1]]


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

    # ---- token statistics ----------------------------------------------------------------

    def token_stats_forward(
        self, x: Tensor, target: Tensor, opts: RowOptions, chunk_rows: int
    ) -> TokenRows:
        acc = acc_dtype(x.dtype)
        lp, ent, lse, am = ref.token_stats(
            _np(x), _np(target), opts.ignore_index, opts.softcap, opts.temperature
        )
        am_t = torch.from_numpy(am).to(x.device)
        return TokenRows(_back(lp, x, acc), _back(ent, x, acc), _back(lse, x, acc), am_t)

    def token_stats_backward(
        self, x: Tensor, target: Tensor, opts: RowOptions, g_lp: Tensor, g_h: Tensor,
        out: Tensor, chunk_rows: int,
    ) -> None:  # fmt: skip
        g = ref.token_stats_grad(
            _np(x), _np(target), _np(g_lp), _np(g_h), opts.ignore_index, opts.softcap,
            opts.temperature,
        )  # fmt: skip
        out.copy_(_back(g, x, out.dtype))

    # ---- a slice of the classes (backends/base.py): in float64, term by term -----------------

    def cross_entropy_partial(
        self, x: Tensor, target: Tensor, weight: Tensor | None, opts: RowOptions, start: int,
        total: int,
    ) -> Tensor:  # fmt: skip
        m, v = x.shape
        parts = np.zeros((INDEX_PARTS, m))
        parts[0] = -np.inf
        wn = None if weight is None else _np(weight)[start : start + v]
        parts[4] = v if wn is None else wn.sum()
        if v:
            tn = _np(target)
            mine = (tn != opts.ignore_index) & (tn >= start) & (tn < start + v)
            u, z = _slice(x, opts, parts)
            parts[2] = np.where(mine, u[np.arange(m), np.where(mine, tn - start, 0)], 0.0)
            if opts.label_smoothing > 0.0:
                with np.errstate(invalid="ignore"):
                    parts[3] = (z if wn is None else z * wn).sum(1)
        return torch.from_numpy(parts).to(x.device)

    def cross_entropy_partial_grad(
        self, x: Tensor, target: Tensor, weight: Tensor | None, opts: RowOptions, start: int,
        total: int, merged: Merged, grad_out: Tensor, grad_scale: Tensor | None = None,
    ) -> None:  # fmt: skip
        m, v = x.shape
        if not (m and v):
            return
        eps = opts.label_smoothing
        tn = _np(target)
        keep = tn != opts.ignore_index
        mine = keep & (tn >= start) & (tn < start + v)
        wt = np.ones(m) if weight is None else _np(weight)[np.where(keep, tn, 0)]
        wn = 1.0 if weight is None else _np(weight)[start : start + v]
        with np.errstate(all="ignore"):
            g = _probs(x, opts, merged) * _np(merged.coef)[:, None] - (eps / total) * wn
            rows = np.nonzero(mine)[0]
            g[rows, tn[rows] - start] -= (1.0 - eps) * wt[rows]
            g = g * _du(_np(x), opts) * (1.0 if grad_scale is None else _scale(grad_scale))
        grad_out.copy_(_back(np.where(keep[:, None], g, 0.0), x, grad_out.dtype))

    def cross_entropy_prob_partial(
        self, x: Tensor, target: Tensor, weight: Tensor | None, opts: RowOptions, start: int,
        total: int,
    ) -> Tensor:  # fmt: skip
        m, v = x.shape
        parts = np.zeros((PROB_PARTS, m))
        parts[0] = -np.inf
        if v:
            ts = _smoothed(target, weight, opts, start, total)
            _, z = _slice(x, opts, parts)
            with np.errstate(invalid="ignore"):
                parts[2] = (ts * z).sum(1)
            parts[3] = ts.sum(1)
        return torch.from_numpy(parts).to(x.device)

    def cross_entropy_prob_partial_grad(
        self, x: Tensor, target: Tensor, weight: Tensor | None, opts: RowOptions, start: int,
        total: int, merged: Merged, grad_out: Tensor, grad_scale: Tensor | None = None,
    ) -> None:  # fmt: skip
        if not x.numel():
            return
        ts = _smoothed(target, weight, opts, start, total)
        with np.errstate(all="ignore"):
            g = _probs(x, opts, merged) * _np(merged.coef)[:, None] - ts
            g = g * _du(_np(x), opts) * (1.0 if grad_scale is None else _scale(grad_scale))
        grad_out.copy_(_back(g, x, grad_out.dtype))

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
