r"""The float64 oracle: softmax, log_softmax, nll_loss and cross_entropy in plain NumPy.

Every crossent backend is tested against this module. It imports NumPy only and shares no code
with the backends, so a bug there cannot hide here. It is validated once against torch 2.13 in
float64 (``tests/test_reference.py``); the formulas are those of ``TORCH_SEMANTICS.md`` (§4 for
values, §6 for gradients), and the section numbers in comments refer to that document.

Conventions:

* Every computation is float64; class-index targets are int64.
* Logits have shape ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``; the class dim is 0 for 1-D
  input and 1 otherwise. Internally they are viewed as rows ``(M, C)`` with the classes last,
  ``M = numel / C``; class-index targets become ``(M,)``.
* Inputs are assumed valid (targets in range, matching shapes); shape sanity is asserted only.
* Intentional 0/0 and 0·inf (all targets ignored, zero total weight, N = 0) produce NaN/inf as
  torch does, silently: those spots run under ``np.errstate``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

_REDUCTIONS = ("none", "mean", "sum")


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _class_dim(ndim: int) -> int:
    assert ndim >= 1, "losses need input with at least 1 dimension"
    return 0 if ndim == 1 else 1


def _to_rows(x: np.ndarray) -> np.ndarray:
    r"""View ``(C,)`` / ``(N, C, d1..dk)`` as rows ``(M, C)``, classes last."""
    cd = _class_dim(x.ndim)
    moved = np.moveaxis(x, cd, -1)  # (N, d1..dk, C)
    n_classes = x.shape[cd]
    return moved.reshape(int(np.prod(moved.shape[:-1])), n_classes)


def _from_rows(rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    r"""Inverse of :func:`_to_rows`: rows ``(M, C)`` back to ``shape``."""
    cd = _class_dim(len(shape))
    moved_shape = shape[:cd] + shape[cd + 1 :] + (shape[cd],)
    return np.array(np.moveaxis(rows.reshape(moved_shape), -1, cd), order="C")


def _index_target(x: np.ndarray, target) -> tuple[np.ndarray, tuple[int, ...]]:
    r"""Class-index target as ``(M,)`` int64, plus the shape of the 'none' output."""
    y = np.asarray(target, dtype=np.int64)
    if x.ndim == 1:  # (C,) input: target () or (1,), output ()
        assert y.shape in ((), (1,)), f"bad target shape {y.shape} for input {x.shape}"
        return y.reshape(1), ()
    expected = x.shape[:1] + x.shape[2:]  # (N, d1..dk)
    assert y.shape == expected, f"bad target shape {y.shape} for input {x.shape}"
    return y.reshape(-1), expected


def _weight(weight, n_classes: int) -> np.ndarray:
    if weight is None:
        return np.ones(n_classes, dtype=np.float64)  # w_c = 1 without weights
    w = _f64(weight)
    assert w.shape == (n_classes,), f"bad weight shape {w.shape} for C={n_classes}"
    return w


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")


def _reduce(per_elem: np.ndarray, reduction: str, denom, out_shape) -> np.ndarray:
    r"""'none': per_elem in out_shape; 'sum': Σ; 'mean': Σ / denom (0/0 = NaN on purpose)."""
    if reduction == "none":
        return per_elem.reshape(out_shape)
    total = per_elem.sum()
    if reduction == "sum":
        return np.asarray(total, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(total / denom, dtype=np.float64)


def _row_scale(grad_output, reduction: str, denom, n_rows: int) -> np.ndarray:
    r"""§6: the per-row factor s_n: g_n ('none'), g ('sum'), g / denom ('mean'); shape (M,)."""
    g = _f64(grad_output)
    if reduction == "none":
        return np.broadcast_to(g.reshape(-1), (n_rows,))
    g = g.reshape(())
    if reduction == "mean":
        with np.errstate(divide="ignore", invalid="ignore"):
            g = g / denom
    return np.full(n_rows, g, dtype=np.float64)


def _smoothing(label_smoothing) -> float:
    r"""§4.3: ε ≤ 0 or NaN means no smoothing (torch tests only ``ε > 0``)."""
    eps = float(label_smoothing)
    if eps > 1.0:
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0. Got: {eps}")
    return eps if eps > 0.0 else 0.0


# --------------------------------------------------------------------------------------------
# softmax / log_softmax (§4.1) and their vector-Jacobian products (§6)
# --------------------------------------------------------------------------------------------


def _along(fn, x: np.ndarray, dim: int, *more: np.ndarray) -> np.ndarray:
    r"""Apply ``fn(x, *more, axis)`` along ``dim``, handling 0-d (a 1-element row) and empty."""
    ndim = max(x.ndim, 1)
    if not -ndim <= dim < ndim:
        raise IndexError(f"Dimension out of range (expected [{-ndim}, {ndim - 1}], got {dim})")
    if x.size == 0:
        return np.empty(x.shape, dtype=np.float64)
    if x.ndim == 0:
        return fn(x.reshape(1), *(m.reshape(1) for m in more), 0).reshape(())
    return fn(x, *more, dim)


def _log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    # log p_i = x_i - m - log Σ_j exp(x_j - m),  m = max_j x_j.
    # All -inf: -inf - (-inf) = NaN; a +inf entry: inf - inf = NaN; both spread over the row.
    m = np.max(x, axis=axis, keepdims=True)
    with np.errstate(invalid="ignore"):
        shifted = x - m
        return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    # p_i = exp(x_i - m) / Σ_j exp(x_j - m); partial -inf gives p_i = 0.
    m = np.max(x, axis=axis, keepdims=True)
    with np.errstate(invalid="ignore"):
        e = np.exp(x - m)
        return e / np.sum(e, axis=axis, keepdims=True)


def _log_softmax_vjp(out: np.ndarray, g: np.ndarray, axis: int) -> np.ndarray:
    # §6: dx = g - exp(out) · Σ_dim g,  out = log_softmax(x)
    with np.errstate(invalid="ignore"):
        return g - np.exp(out) * np.sum(g, axis=axis, keepdims=True)


def softmax(x, dim: int) -> np.ndarray:
    r"""Return ``softmax(x)`` along ``dim`` (max-subtracted, stable for ±1e30 logits)."""
    return _along(_softmax, _f64(x), dim)


def log_softmax(x, dim: int) -> np.ndarray:
    r"""Return ``log_softmax(x)`` along ``dim`` (max-subtracted, stable for ±1e30 logits)."""
    return _along(_log_softmax, _f64(x), dim)


def log_softmax_grad(x, dim: int, grad_output) -> np.ndarray:
    r"""Return the gradient of ``<grad_output, log_softmax(x, dim)>`` with respect to ``x``."""

    def vjp(x, g, axis):
        return _log_softmax_vjp(_log_softmax(x, axis), g, axis)

    x = _f64(x)
    return _along(vjp, x, dim, np.broadcast_to(_f64(grad_output), x.shape))


def softmax_grad(x, dim: int, grad_output) -> np.ndarray:
    r"""Return the gradient of ``<grad_output, softmax(x, dim)>`` with respect to ``x``."""

    def vjp(x, g, axis):
        # §6: dx = out ⊙ (g - Σ_dim (g ⊙ out))
        out = _softmax(x, axis)
        with np.errstate(invalid="ignore"):
            return out * (g - np.sum(g * out, axis=axis, keepdims=True))

    x = _f64(x)
    return _along(vjp, x, dim, np.broadcast_to(_f64(grad_output), x.shape))


# --------------------------------------------------------------------------------------------
# nll_loss (§4.2): per-row pieces shared by nll_loss and the class-index cross_entropy
# --------------------------------------------------------------------------------------------


class _Picked(NamedTuple):
    keep: np.ndarray  # (M,) bool: y_n != ii
    y: np.ndarray  # (M,) int64: y_n, or 0 where ignored (a safe index, always masked out)
    w_y: np.ndarray  # (M,) w[y_n], 0 where ignored
    denom: np.float64  # Σ_{n: y_n != ii} w[y_n]: the 'mean' denominator of §4.2 and §4.3


def _pick(y: np.ndarray, w: np.ndarray, ignore_index: int) -> _Picked:
    keep = y != ignore_index
    y_safe = np.where(keep, y, 0)
    w_y = np.where(keep, w[y_safe], 0.0)
    return _Picked(keep, y_safe, w_y, w_y.sum())


def _nll_rows(inp: np.ndarray, pk: _Picked) -> np.ndarray:
    r"""§4.2: ℓ_n = -w[y_n] · x[n, y_n], and exactly 0 where y_n == ii (masked, never 0·inf)."""
    x_y = inp[np.arange(inp.shape[0]), pk.y]  # (M,)
    with np.errstate(invalid="ignore"):  # 0-weight · (-inf) = NaN in a kept row, as torch
        return np.where(pk.keep, -pk.w_y * x_y, 0.0)


def _nll_rows_grad(shape: tuple[int, int], pk: _Picked, s: np.ndarray) -> np.ndarray:
    r"""§6: d/dx[n, y_n] = -w[y_n] · s_n for kept rows; 0 elsewhere (placed, not multiplied)."""
    grad = np.zeros(shape, dtype=np.float64)  # (M, C)
    rows = np.flatnonzero(pk.keep)
    with np.errstate(invalid="ignore"):  # zero total weight: -w·(g/0) is NaN or ±inf, as torch
        grad[rows, pk.y[rows]] = pk.w_y[rows] * -s[rows]
    return grad


def nll_loss(input, target, weight=None, ignore_index=-100, reduction="mean") -> np.ndarray:
    r"""Return the negative log-likelihood loss of ``input`` at the class indices ``target``.

    'mean' divides by the summed weight of the non-ignored targets (NaN when all are ignored).
    """
    _check_reduction(reduction)
    x = _f64(input)
    rows = _to_rows(x)  # (M, C)
    y, out_shape = _index_target(x, target)
    pk = _pick(y, _weight(weight, rows.shape[1]), int(ignore_index))
    return _reduce(_nll_rows(rows, pk), reduction, pk.denom, out_shape)


def nll_loss_grad(
    input, target, grad_output, weight=None, ignore_index=-100, reduction="mean"
) -> np.ndarray:
    r"""Return the gradient of ``nll_loss`` with respect to ``input`` for ``grad_output``."""
    _check_reduction(reduction)
    x = _f64(input)
    rows = _to_rows(x)  # (M, C)
    y, _ = _index_target(x, target)
    pk = _pick(y, _weight(weight, rows.shape[1]), int(ignore_index))
    s = _row_scale(grad_output, reduction, pk.denom, rows.shape[0])  # (M,)
    return _from_rows(_nll_rows_grad(rows.shape, pk, s), x.shape)


# --------------------------------------------------------------------------------------------
# cross_entropy: class indices with label smoothing (§4.3), probability targets (§4.4)
# --------------------------------------------------------------------------------------------


def _is_prob_target(x: np.ndarray, target) -> bool:
    return np.shape(target) == x.shape  # §2: only exact shape equality selects this path


def _smooth_rows(lp: np.ndarray, w: np.ndarray, pk: _Picked) -> np.ndarray:
    r"""§4.3: s_n = -Σ_c w_c · lp[n, c], exactly 0 where y_n == ii."""
    lp_kept = np.where(pk.keep[:, None], lp, 0.0)  # mask first: ignored rows may hold -inf
    with np.errstate(invalid="ignore"):  # w_c = 0 on a -inf logit in a kept row: NaN, as torch
        return -np.sum(w * lp_kept, axis=1)


def _smoothed_probs(t: np.ndarray, eps: float, n_classes: int) -> np.ndarray:
    # §4.4: t' = t·(1 - ε) + ε/C when ε > 0
    return t * (1.0 - eps) + eps / n_classes if eps > 0.0 else t


def _ce_value(
    input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0
) -> np.ndarray:
    r"""Return the cross entropy of logits ``input`` against class indices or probabilities.

    ``target`` with the shape of ``input`` holds class probabilities (§4.4); otherwise class
    indices, with optional label smoothing (§4.3).
    """
    _check_reduction(reduction)
    eps = _smoothing(label_smoothing)
    x = _f64(input)
    lp = _to_rows(_log_softmax(x, _class_dim(x.ndim)))  # (M, C)
    n_rows, n_classes = lp.shape
    w = _weight(weight, n_classes)

    if _is_prob_target(x, target):
        t = _smoothed_probs(_to_rows(_f64(target)), eps, n_classes)  # (M, C)
        with np.errstate(invalid="ignore"):  # t = 0 on a -inf logit: 0·(-inf) = NaN, as torch
            loss = -np.sum(w * t * lp, axis=1)  # ℓ_n = -Σ_c w_c t'_nc lp_nc
        out_shape = x.shape[:1] + x.shape[2:] if x.ndim > 1 else ()
        return _reduce(loss, reduction, n_rows, out_shape)  # 'mean': / (numel / C)

    y, out_shape = _index_target(x, target)
    pk = _pick(y, w, int(ignore_index))
    nll = _reduce(_nll_rows(lp, pk), reduction, pk.denom, out_shape)  # §4.2 applied to lp
    if eps == 0.0:
        return nll
    smooth = _reduce(_smooth_rows(lp, w, pk), reduction, pk.denom, out_shape)
    # (1 - ε)·NLL + (ε/C)·S, each reduced on its own with the same denominator Σ w[y_n].
    # Reducing before combining keeps torch's NaN/inf: zero total weight gives NaN + inf = NaN.
    with np.errstate(invalid="ignore"):
        return np.asarray((1.0 - eps) * nll + (eps / n_classes) * smooth, dtype=np.float64)


class CrossEntropyGrads(NamedTuple):
    r"""Gradients of :func:`cross_entropy`; ``target`` and ``weight`` only on the probability
    path (``weight`` also only when a weight was given), else ``None``."""

    input: np.ndarray
    target: np.ndarray | None
    weight: np.ndarray | None


def _ce_grad(
    input,
    target,
    grad_output,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
) -> CrossEntropyGrads:
    r"""Return the gradients of ``cross_entropy`` for ``grad_output`` (a CrossEntropyGrads).

    Computed by the chain rule as torch does: first d loss / d lp, then the log_softmax VJP
    ``dx = g_lp - p · Σ_c g_lp`` (§6). This also reproduces torch's NaN/inf pattern in the
    degenerate cases (zero total weight, -inf logits).
    """
    _check_reduction(reduction)
    eps = _smoothing(label_smoothing)
    x = _f64(input)
    lp = _to_rows(_log_softmax(x, _class_dim(x.ndim)))  # (M, C)
    n_rows, n_classes = lp.shape
    w = _weight(weight, n_classes)

    if _is_prob_target(x, target):
        t = _smoothed_probs(_to_rows(_f64(target)), eps, n_classes)  # t', (M, C)
        s = _row_scale(grad_output, reduction, n_rows, n_rows)[:, None]  # (M, 1)
        with np.errstate(invalid="ignore"):
            g_lp = -s * w * t  # d loss / d lp[n, c] = -s_n w_c t'_nc
            # §6: d target = -(1 - ε) · s · w ⊙ lp   (d t'/d t = 1 - ε, or 1 without smoothing)
            g_t = -(1.0 - eps) * s * w * lp
            # §6: d w_c = -Σ_n s_n t'_nc lp_nc
            g_w = None if weight is None else -np.sum(s * t * lp, axis=0)
        g_x = _log_softmax_vjp(lp, g_lp, axis=1)  # (M, C)
        return CrossEntropyGrads(_from_rows(g_x, x.shape), _from_rows(g_t, x.shape), g_w)

    y, _ = _index_target(x, target)
    pk = _pick(y, w, int(ignore_index))
    s = _row_scale(grad_output, reduction, pk.denom, n_rows)  # (M,)
    g_lp = _nll_rows_grad(lp.shape, pk, s)  # NLL part: -w[y_n] s_n at the target, (M, C)
    if eps > 0.0:
        with np.errstate(invalid="ignore"):
            # smoothing part: d S / d lp[n, c] = -w_c s_n on kept rows, 0 on ignored rows
            g_smooth = np.where(pk.keep[:, None], -s[:, None] * w, 0.0)
            g_lp = (1.0 - eps) * g_lp + (eps / n_classes) * g_smooth
    # Together with the VJP this is §6's closed form
    #   dx[n, j] = keep_n s_n (p[n, j] Σ_c w_c q[n, c] - w_j q[n, j]),  q = (1 - ε)·onehot(y) + ε/C
    g_x = _log_softmax_vjp(lp, g_lp, axis=1)  # (M, C)
    return CrossEntropyGrads(_from_rows(g_x, x.shape), None, None)


# --------------------------------------------------------------------------------------------
# cross_entropy with crossent's extensions: temperature, soft-capping, z-loss
# --------------------------------------------------------------------------------------------
#
# The logits are first transformed, u = c·tanh(x / c) when a soft cap c is given (Gemma 2),
# then u = u / T for a temperature T; the cross entropy above is taken of u. The z-loss adds
# λ·lse(u)² to every non-ignored row's loss (PaLM), reduced like the cross entropy itself
# ('mean': divided by the same denominator).


def logit_transform(x: np.ndarray, softcap, temperature) -> tuple[np.ndarray, np.ndarray]:
    """The transformed logits u and du/dx, elementwise."""
    u, du = x, np.ones_like(x)
    if softcap is not None:
        th = np.tanh(x / softcap)
        u, du = softcap * th, 1.0 - th * th
    if temperature != 1.0:
        u, du = u / temperature, du / temperature
    return u, du


def _z_rows(u: np.ndarray, target, weight, ignore_index) -> tuple[np.ndarray, np.ndarray, object]:
    """Per-row lse(u) and keep mask (rows, class dim last), and the 'mean' denominator."""
    rows = _to_rows(u)
    lse = np.log(np.sum(np.exp(rows - rows.max(axis=1, keepdims=True)), axis=1))
    lse = lse + rows.max(axis=1)
    if _is_prob_target(u, target):
        return lse, np.ones(rows.shape[0], dtype=bool), rows.shape[0]
    y, _ = _index_target(u, target)
    pk = _pick(y, _weight(weight, rows.shape[1]), int(ignore_index))
    return lse, pk.keep, pk.denom


def cross_entropy(
    input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
    z_loss=0.0, softcap=None, temperature=1.0,
) -> np.ndarray:
    r"""Return the cross entropy of logits ``input`` against class indices or probabilities.

    ``target`` with the shape of ``input`` holds class probabilities (§4.4); otherwise class
    indices, with optional label smoothing (§4.3). ``z_loss``, ``softcap`` and ``temperature``
    as described above (all off by default).
    """
    x = _f64(input)
    u, _ = logit_transform(x, softcap, temperature)
    loss = _ce_value(u, target, weight, ignore_index, reduction, label_smoothing)
    if z_loss == 0.0:
        return loss
    lse, keep, denom = _z_rows(u, target, weight, ignore_index)
    z = np.where(keep, z_loss * lse * lse, 0.0)
    out_shape = np.shape(loss) if reduction == "none" else ()
    return np.asarray(loss + _reduce(z, reduction, denom, out_shape), dtype=np.float64)


def cross_entropy_grad(
    input,
    target,
    grad_output,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    temperature=1.0,
) -> CrossEntropyGrads:
    r"""Return the gradients of ``cross_entropy`` for ``grad_output`` (a CrossEntropyGrads).

    Computed by the chain rule as torch does: first d loss / d lp, then the log_softmax VJP
    ``dx = g_lp - p · Σ_c g_lp`` (§6), then, with the extensions, d lse² / d u = 2·lse·p and
    d u / d x of the transform.
    """
    x = _f64(input)
    u, du = logit_transform(x, softcap, temperature)
    g = _ce_grad(u, target, grad_output, weight, ignore_index, reduction, label_smoothing)
    g_u = g.input
    if z_loss != 0.0:
        lse, keep, denom = _z_rows(u, target, weight, ignore_index)
        rows = _to_rows(u)
        s = _row_scale(grad_output, reduction, denom, rows.shape[0])  # (M,)
        p = np.exp(rows - lse[:, None])
        g_z = np.where(keep[:, None], 2.0 * z_loss * (s * lse)[:, None] * p, 0.0)
        g_u = g_u + _from_rows(g_z, x.shape)
    return CrossEntropyGrads(g_u * du, g.target, g.weight)


# --------------------------------------------------------------------------------------------
# token statistics (crossent.token_stats): per-token log-probability, entropy, lse, argmax
# --------------------------------------------------------------------------------------------
#
# Over the last dim of the logits, read through the transform above: with lp = log_softmax(u)
# and p = exp(lp), logprob = lp[y] (0 where y == ignore_index), entropy = -Σ p·lp,
# lse = log Σ exp(u), argmax = argmax u.


def token_stats(input, target, ignore_index=-100, softcap=None, temperature=1.0):
    """Return ``(logprob, entropy, lse, argmax)``, each of the shape of ``target``
    (``input.shape[:-1]``), of the softmax over the last dim of ``input``."""
    u, _ = logit_transform(_f64(input), softcap, temperature)
    y = np.asarray(target, dtype=np.int64)
    assert u.shape[:-1] == y.shape, "target has the logits' shape without the class dim"
    if u.shape[-1] == 0:  # no classes: every target is ignored; log 0 = -inf, entropy 0
        zeros = np.zeros(y.shape)
        return zeros, zeros, np.full(y.shape, -np.inf), np.zeros(y.shape, dtype=np.int64)
    lp = _log_softmax(u, -1)
    keep = y != ignore_index
    picked = np.take_along_axis(lp, np.where(keep, y, 0)[..., None], -1)[..., 0]
    with np.errstate(invalid="ignore"):
        p = np.exp(lp)
        entropy = -np.sum(np.where(p == 0.0, 0.0, p * lp), axis=-1)  # 0·log 0 = 0
        mx = np.max(u, axis=-1)
        lse = np.log(np.sum(np.exp(u - mx[..., None]), axis=-1)) + mx
    return np.where(keep, picked, 0.0), entropy, lse, np.argmax(u, axis=-1)


def token_stats_grad(
    input, target, grad_logprob, grad_entropy, ignore_index=-100, softcap=None, temperature=1.0
) -> np.ndarray:
    """Return ``d(Σ grad_logprob·logprob + grad_entropy·entropy) / d input``.

    The log_softmax VJP of ``g_lp = grad_logprob·onehot(y) - grad_entropy·(lp + 1)·p`` (the
    derivative of -Σ p·lp through p = exp(lp)), then d u / d x."""
    x = _f64(input)
    u, du = logit_transform(x, softcap, temperature)
    y = np.asarray(target, dtype=np.int64)
    if u.shape[-1] == 0:
        return np.zeros_like(x)
    lp = _log_softmax(u, -1)
    keep = y != ignore_index
    with np.errstate(invalid="ignore"):
        p = np.exp(lp)
        g_lp = -_f64(grad_entropy)[..., None] * np.where(p == 0.0, 0.0, (lp + 1.0) * p)
    onehot = np.zeros_like(lp)
    np.put_along_axis(onehot, np.where(keep, y, 0)[..., None], 1.0, -1)
    g_lp = g_lp + np.where(keep, _f64(grad_logprob), 0.0)[..., None] * onehot
    return _log_softmax_vjp(lp, g_lp, -1) * du
