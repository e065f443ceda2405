"""Portable primitives in plain torch: any device torch supports.

Cross entropy is computed a chunk of rows at a time, so that the float32/float64 temporaries
(the upcast logits and their exponentials) stay cache-sized instead of logits-sized. Each chunk
evaluates one exponential per element and writes the gradient of its rows straight into the
caller's buffer: no log-probability tensor is ever kept.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import (
    INDEX_PARTS,
    PROB_PARTS,
    Backend,
    Merged,
    RowOptions,
    RowStats,
    TokenRows,
    acc_dtype,
    index_coef,
    index_loss,
    logit_transform,
    no_class_parts,
    no_classes,
    prob_acc_dtype,
    reference_point,
    slice_targets,
)

# Elements per chunk of upcast temporaries: on CPU 2**20 float32 = 4 MiB, about an L2 cache.
# On other devices every chunk costs a dozen kernel launches whatever its size, so chunks are
# large there: 2**24 elements (64 MiB of float32), a handful per logits tensor.
CHUNK_ELEMENTS = 1 << 20
DEVICE_CHUNK_ELEMENTS = 1 << 24


def chunk_elements(device: torch.device) -> int:
    """The chunk budget, in elements, for tensors on ``device``."""
    return CHUNK_ELEMENTS if device.type == "cpu" else DEVICE_CHUNK_ELEMENTS


def chunk_rows(m: int, v: int, budget: int = CHUNK_ELEMENTS) -> int:
    """Rows per chunk so that a chunk holds at most ``budget`` elements (at least one row)."""
    return max(1, budget // max(v, 1))


def budget_rows(x: Tensor) -> int:
    """:func:`chunk_rows` of the ``(M, V)`` block ``x`` with its device's budget."""
    return chunk_rows(x.shape[0], x.shape[1], chunk_elements(x.device))


class TorchBackend(Backend):
    """Plain-torch primitives; the portable fallback and the baseline of the fused kernels."""

    name = "torch"

    # ---- softmax / log_softmax: torch's own kernels on the (M, V) block ----------------------

    # Half precision is computed in float32 and rounded once (torch's last-dim half kernels
    # round intermediate values and can land an ulp further from the exact result).

    def softmax_forward(self, x: Tensor, log: bool) -> Tensor:
        xc = x.to(acc_dtype(x.dtype))
        out = torch._log_softmax(xc, -1, False) if log else torch._softmax(xc, -1, False)
        return out.to(x.dtype)

    def softmax_backward(self, grad: Tensor, out: Tensor, log: bool) -> Tensor:
        acc = acc_dtype(out.dtype)
        g, o = grad.to(acc), out.to(acc)
        if log:
            return torch._log_softmax_backward_data(g, o, -1, acc).to(out.dtype)
        return torch._softmax_backward_data(g, o, -1, acc).to(out.dtype)

    # ---- cross entropy, class-index targets --------------------------------------------------

    def cross_entropy_forward(
        self,
        x: Tensor,
        target: Tensor,
        weight: Tensor | None,
        opts: RowOptions,
        grad_out: Tensor | None = None,
        grad_scale: Tensor | None = None,
    ) -> RowStats:
        m, v = x.shape
        acc = acc_dtype(x.dtype)
        if v == 0:  # no classes: every row is ignored (targets were range-checked)
            return no_classes(m, acc, x.device)
        loss = torch.empty(m, dtype=acc, device=x.device)
        lse = torch.empty(m, dtype=acc, device=x.device)
        eps = opts.label_smoothing
        w = None if weight is None else weight.to(acc)
        w_total = None if w is None else w.sum()
        step = chunk_rows(m, v, chunk_elements(x.device))
        for r0 in range(0, m, step):
            r1 = min(m, r0 + step)
            xs, du = logit_transform(x[r0:r1].to(acc), opts)  # (m', V) upcast chunk
            t = target[r0:r1]
            keep = (t != opts.ignore_index).unsqueeze(1)  # (m', 1)
            tc = torch.where(keep.squeeze(1), t, 0).unsqueeze(1)  # ignored rows read class 0
            mx = xs.amax(1, keepdim=True)  # (m', 1)
            z = xs - mx  # (m', V) shifted logits
            e = torch.exp(z)  # the only exponential of each element
            s = e.sum(1, keepdim=True)
            log_s = torch.log(s)  # (m', 1); -log p = log_s - z stays small for large logits
            wt = 1.0 if w is None else w[tc]  # (m', 1) weight of the target class
            smooth = None
            if eps > 0.0:
                dev = log_s - z  # (m', V): -log p
                smooth = dev.sum(1, keepdim=True) if w is None else (dev * w).sum(1, keepdim=True)
            row_lse = mx + log_s
            row = index_loss((log_s - z.gather(1, tc)) * wt, smooth, eps, v, row_lse, opts.z_loss)
            loss[r0:r1] = row.squeeze(1).masked_fill(~keep.squeeze(1), 0.0)
            lse[r0:r1] = row_lse.squeeze(1)
            if grad_out is None:
                continue
            c = 1.0 if grad_scale is None else row_scale(grad_scale, r0, r1, acc)
            a = index_coef(wt, eps, v, v if w_total is None else w_total, row_lse, opts.z_loss)
            t_term = torch.as_tensor(-(1.0 - eps) * wt * c, dtype=acc, device=x.device)
            grad_out[r0:r1] = index_grad_(
                e, a * c / s, c, eps, v, w, tc, t_term.expand_as(mx), du, keep
            )
        return RowStats(loss, lse)

    # ---- cross entropy over a slice of the classes ---------------------------------------------

    # ---- token statistics: chunks of rows, the softmax formed once per chunk ----------------

    def token_stats_forward(
        self, x: Tensor, target: Tensor, opts: RowOptions, chunk_rows: int
    ) -> TokenRows:
        m, v = x.shape
        step = chunk_rows or budget_rows(x)
        acc = acc_dtype(x.dtype)
        out = TokenRows.empty(m, acc, x.device)
        for r0 in range(0, m, step):
            r1 = min(m, r0 + step)
            z, p, log_s, keep, _, u, mx = _token_rows(x[r0:r1], target[r0:r1], opts)
            picked = z.gather(1, torch.where(keep, target[r0:r1], 0).unsqueeze(1))
            out.logprob[r0:r1] = torch.where(keep, (picked - log_s).squeeze(1), 0.0)
            out.entropy[r0:r1] = (log_s - (p * z).sum(1, keepdim=True)).squeeze(1)
            out.lse[r0:r1] = (mx + log_s).squeeze(1)
            out.argmax[r0:r1] = u.argmax(1)
        return out

    def token_stats_backward(
        self, x: Tensor, target: Tensor, opts: RowOptions, g_lp: Tensor, g_h: Tensor,
        out: Tensor, chunk_rows: int,
    ) -> None:  # fmt: skip
        m, v = x.shape
        step = chunk_rows or budget_rows(x)
        for r0 in range(0, m, step):
            r1 = min(m, r0 + step)
            t = target[r0:r1]
            z, p, _, keep, du, _, _ = _token_rows(x[r0:r1], t, opts)
            mean_z = (p * z).sum(1, keepdim=True)
            glp = torch.where(keep, g_lp[r0:r1], 0.0)  # an ignored token's logprob is 0
            g = p * (-(glp.unsqueeze(1)) - g_h[r0:r1].unsqueeze(1) * (z - mean_z))
            g.scatter_add_(1, torch.where(keep, t, 0).unsqueeze(1), glp.unsqueeze(1))
            if du is not None:
                g.mul_(du)
            out[r0:r1] = g

    def cross_entropy_partial(
        self, x: Tensor, target: Tensor, weight: Tensor | None, opts: RowOptions, start: int,
        total: int,
    ) -> Tensor:  # fmt: skip
        m, v = x.shape
        acc = acc_dtype(x.dtype)
        parts = no_class_parts(INDEX_PARTS, m, x.device)
        if v == 0:
            return parts
        w = None if weight is None else weight[start : start + v].to(acc)
        parts[4] = v if w is None else w.sum(dtype=torch.float64)
        st = slice_targets(target, None, opts, start, v, acc)
        tl = st.col.clamp(min=0).unsqueeze(1)  # (M, 1): column 0 on rows not in the slice
        step = chunk_rows(m, v, chunk_elements(x.device))
        for r0 in range(0, m, step):
            r1 = min(m, r0 + step)
            u, _ = logit_transform(x[r0:r1].to(acc), opts, derivative=False)
            z = _slice_exp_sum(parts, u, r0, r1)
            parts[2, r0:r1] = torch.where(st.mine[r0:r1], u.gather(1, tl[r0:r1]).squeeze(1), 0.0)
            if opts.label_smoothing > 0.0:
                wz = z if w is None else z * w
                parts[3, r0:r1] = wz.sum(1, dtype=torch.float64)
        return parts

    def cross_entropy_partial_grad(
        self, x: Tensor, target: Tensor, weight: Tensor | None, opts: RowOptions, start: int,
        total: int, merged: Merged, grad_out: Tensor, grad_scale: Tensor | None = None,
    ) -> None:  # fmt: skip
        m, v = x.shape
        if v == 0 or m == 0:
            return
        acc = acc_dtype(x.dtype)
        eps = opts.label_smoothing
        w = None if weight is None else weight[start : start + v].to(acc)
        st = slice_targets(target, weight, opts, start, v, acc)
        tl = st.col.clamp(min=0).unsqueeze(1)  # column 0 on rows not in the slice, where
        t_all = (-st.term).unsqueeze(1)  # the target's term is 0
        keep = st.keep.unsqueeze(1)
        lse = merged.lse.to(acc).unsqueeze(1)
        coef = merged.coef.to(acc).unsqueeze(1)
        step = chunk_rows(m, v, chunk_elements(x.device))
        for r0 in range(0, m, step):
            r1 = min(m, r0 + step)
            c = 1.0 if grad_scale is None else row_scale(grad_scale, r0, r1, acc)
            u, du = logit_transform(x[r0:r1].to(acc), opts)
            e = torch.exp(u - lse[r0:r1])  # p_j
            grad_out[r0:r1] = index_grad_(
                e, coef[r0:r1] * c, c, eps, total, w, tl[r0:r1], t_all[r0:r1] * c, du,
                keep[r0:r1],
            )

    def cross_entropy_prob_partial(
        self, x: Tensor, target: Tensor, weight: Tensor | None, opts: RowOptions, start: int,
        total: int,
    ) -> Tensor:  # fmt: skip
        m, v = x.shape
        acc = prob_acc_dtype(x, target, weight)
        parts = no_class_parts(PROB_PARTS, m, x.device)
        if v == 0:
            return parts
        w = None if weight is None else weight[start : start + v].to(acc)
        step = chunk_rows(m, v, chunk_elements(x.device))
        for r0 in range(0, m, step):
            r1 = min(m, r0 + step)
            u, _ = logit_transform(x[r0:r1].to(acc), opts, derivative=False)
            ts = smoothed(target[r0:r1].to(acc), opts.label_smoothing, total)
            if w is not None:
                ts = ts * w
            z = _slice_exp_sum(parts, u, r0, r1)
            parts[2, r0:r1] = (ts * z).sum(1, dtype=torch.float64)  # product first, as torch
            parts[3, r0:r1] = ts.sum(1, dtype=torch.float64)
        return parts

    def cross_entropy_prob_partial_grad(
        self, x: Tensor, target: Tensor, weight: Tensor | None, opts: RowOptions, start: int,
        total: int, merged: Merged, grad_out: Tensor, grad_scale: Tensor | None = None,
    ) -> None:  # fmt: skip
        m, v = x.shape
        if v == 0 or m == 0:
            return
        acc = prob_acc_dtype(x, target, weight)
        w = None if weight is None else weight[start : start + v].to(acc)
        lse = merged.lse.to(acc).unsqueeze(1)
        coef = merged.coef.to(acc).unsqueeze(1)
        step = chunk_rows(m, v, chunk_elements(x.device))
        for r0 in range(0, m, step):
            r1 = min(m, r0 + step)
            u, du = logit_transform(x[r0:r1].to(acc), opts)
            ts = smoothed(target[r0:r1].to(acc), opts.label_smoothing, total)
            if w is not None:
                ts = ts * w
            g = torch.exp(u - lse[r0:r1]).mul_(coef[r0:r1]).sub_(ts)  # p·coef - w t'
            if grad_scale is not None:
                g.mul_(row_scale(grad_scale, r0, r1, acc))
            if du is not None:
                g.mul_(du)
            grad_out[r0:r1] = g

    # ---- cross entropy, probability targets --------------------------------------------------

    def cross_entropy_prob_forward(
        self,
        x: Tensor,
        target: Tensor,
        weight: Tensor | None,
        opts: RowOptions,
        grad_out: Tensor | None = None,
        grad_scale: Tensor | None = None,
    ) -> RowStats:
        m, v = x.shape
        acc = prob_acc_dtype(x, target, weight)
        if v == 0:
            return no_classes(m, acc, x.device)
        loss = torch.empty(m, dtype=acc, device=x.device)
        lse = torch.empty(m, dtype=acc, device=x.device)
        eps = opts.label_smoothing
        w = None if weight is None else weight.to(acc)
        step = chunk_rows(m, v, chunk_elements(x.device))
        for r0 in range(0, m, step):
            r1 = min(m, r0 + step)
            xs, du = logit_transform(x[r0:r1].to(acc), opts)
            ts = smoothed(target[r0:r1].to(acc), eps, v)  # (m', V) t'
            if w is not None:
                ts = ts * w  # w ⊙ t'
            mx = xs.amax(1, keepdim=True)
            z = xs - mx
            e = torch.exp(z)
            s = e.sum(1, keepdim=True)
            log_s = torch.log(s)
            # -Σ_c w_c t'_c log p_c: product first, as torch does (0·(-inf) is NaN there too)
            row_lse = mx + log_s
            row = -(ts * (z - log_s)).sum(1)
            if opts.z_loss:
                row = row + opts.z_loss * (row_lse * row_lse).squeeze(1)
            loss[r0:r1] = row
            lse[r0:r1] = row_lse.squeeze(1)
            if grad_out is None:
                continue
            # d row / d x = p·(Σ_c w_c t'_c + 2λ·lse) − w ⊙ t'
            coef = ts.sum(1, keepdim=True)
            if opts.z_loss:
                coef = coef + 2.0 * opts.z_loss * row_lse
            g = e.div_(s).mul_(coef).sub_(ts)
            if grad_scale is not None:
                g.mul_(row_scale(grad_scale, r0, r1, acc))
            if du is not None:
                g.mul_(du)
            grad_out[r0:r1] = g
        return RowStats(loss, lse)

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
        m, v = x.shape
        acc = lse.dtype
        eps = opts.label_smoothing
        w = None if weight is None else weight.to(acc)
        d_target = torch.empty_like(target) if want_target else None
        d_weight = torch.zeros(v, dtype=acc, device=x.device) if want_weight else None
        rg = row_grad.to(acc).unsqueeze(1)  # (M, 1)
        step = chunk_rows(m, v, chunk_elements(x.device))
        for r0 in range(0, m, step):
            r1 = min(m, r0 + step)
            # (m', V) log-probabilities as (x - max) - log Σ exp(x - max): forming x - lse
            # instead would lose an ulp of the largest logit (this rare path pays one more exp)
            z, _ = logit_transform(x[r0:r1].to(acc), opts, derivative=False)
            z = z - z.amax(1, keepdim=True)
            lp = z - torch.log(torch.exp(z).sum(1, keepdim=True))
            if d_target is not None:
                # d row / d t = -(1-ε)·w ⊙ lp
                dt = lp * (-(1.0 - eps)) * rg[r0:r1]
                d_target[r0:r1] = dt if w is None else dt * w
            if d_weight is not None:
                ts = smoothed(target[r0:r1].to(acc), eps, v)
                d_weight -= (rg[r0:r1] * ts * lp).sum(0)
        if d_weight is not None and weight is not None:
            return d_target, d_weight.to(weight.dtype)
        return d_target, None

    # ---- nll_loss ----------------------------------------------------------------------------

    def nll_forward(
        self, x: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int
    ) -> Tensor:
        acc = acc_dtype(x.dtype)
        if x.shape[1] == 0:
            return no_classes(x.shape[0], acc, x.device).loss
        keep = target != ignore_index
        tc = torch.where(keep, target, 0)
        picked = x.gather(1, tc.unsqueeze(1)).squeeze(1).to(acc)  # (M,)
        if weight is not None:
            picked = picked * weight.to(acc)[tc]
        return (-picked).masked_fill_(~keep, 0.0)

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
        if num_classes == 0:
            return torch.zeros(m, 0, dtype=dtype, device=target.device)
        keep = target != ignore_index
        tc = torch.where(keep, target, 0)
        acc = acc_dtype(dtype)
        val = -row_grad.to(acc).expand(m)
        if weight is not None:
            val = val * weight.to(acc)[tc]
        grad = torch.zeros(m, num_classes, dtype=dtype, device=target.device)
        grad.scatter_(1, tc.unsqueeze(1), val.masked_fill(~keep, 0.0).to(dtype).unsqueeze(1))
        return grad


def _token_rows(x: Tensor, target: Tensor, opts: RowOptions) -> tuple[Any, ...]:
    """Of one chunk of rows: ``z = u - max``, ``p``, ``log Σ exp(z)``, the kept mask, d u / d x,
    u itself and its max (the logits upcast to the accumulation dtype and read)."""
    u, du = logit_transform(x.to(acc_dtype(x.dtype)), opts)
    mx = u.amax(1, keepdim=True)
    z = u - mx  # shifted: the sums below then cancel little
    e = torch.exp(z)  # forward and backward alike: exp(z - log Σ) would round twice
    s = e.sum(1, keepdim=True)
    p = e.div_(s)
    return z, p, torch.log(s), target != opts.ignore_index, du, u, mx


def index_grad_(
    e: Tensor, k: Any, c: Any, eps: float, v: int, w: Tensor | None, t_col: Tensor,
    t_term: Tensor, du: Tensor | None, keep: Tensor,
) -> Tensor:  # fmt: skip
    """The gradient of a chunk of rows, written over ``e = exp(u - m)``: d row / d x_j =
    p_j·a − w_j·q_j with q = (1−ε)·onehot(y) + ε/V, times the row's scale ``c``, formed as
    ``e_j·k`` (``k = a·c/s``: one per-row factor, no rounded p_j) ``- (ε/V)·c·w_j``, plus
    ``t_term`` (``-(1-ε)·w_y·c``, ``(m', 1)``) at column ``t_col``, times ``du`` when the logits
    were transformed; ``keep`` (``(m', 1)``) False makes a row exactly 0, even beside -inf
    logits (masking, not multiplying by 0). ``v``: the number of classes of the whole row."""
    g = e.mul_(k)
    if eps > 0.0:
        if w is None:
            g.sub_((eps / v) * c)
        else:  # - (ε/V)·c·w_j
            g.addcmul_(torch.as_tensor(c, dtype=e.dtype, device=e.device), w, value=-eps / v)
    g.scatter_add_(1, t_col, t_term.contiguous())
    if du is not None:
        g.mul_(du)
    return g.masked_fill_(~keep, 0.0)


def _slice_exp_sum(parts: Tensor, u: Tensor, r0: int, r1: int) -> Tensor:
    """Rows ``r0:r1`` of a slice's first two partial statistics from its logits ``u`` as read:
    the max, Σ exp(u - ref); returns ``u - ref`` (see ``reference_point``)."""
    mx = u.amax(1)
    z = u - reference_point(mx).unsqueeze(1)
    parts[0, r0:r1] = mx
    parts[1, r0:r1] = torch.exp(z).sum(1, dtype=torch.float64)
    return z


def row_scale(grad_scale: Tensor, r0: int, r1: int, acc: torch.dtype) -> Tensor:
    """Rows ``r0:r1`` of a gradient scale: a 0-d tensor, or one value per row."""
    if grad_scale.dim() == 0:
        return grad_scale.to(acc)
    return grad_scale[r0:r1].to(acc).unsqueeze(1)


def smoothed(t: Tensor, eps: float, v: int) -> Tensor:
    """``t' = (1-ε)·t + ε/V`` (``t`` itself when ``ε == 0``)."""
    return t if eps == 0.0 else t * (1.0 - eps) + eps / v
