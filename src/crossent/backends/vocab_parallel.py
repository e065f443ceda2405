"""Cross entropy over logits whose classes are split across the ranks of a process group.

Rank ``r`` holds the columns ``[start, start + V_r)`` of every row; the targets (global class
indices) and the class weights (all ``V`` of them) are the same on every rank. A row's loss
needs three things from the whole vocabulary, and each is a max or a sum, so it merges from
per-shard parts with two collectives on ``(M,)`` vectors, whatever the vocabulary size:

1. ``mx = max_j u_j`` (all-reduce MAX), ``u`` the logits as the loss reads them;
2. with ``z = u - mx``: ``s = Σ_j exp(z_j)``, the target's ``z_y`` (held by one rank, 0 on the
   others) and, for label smoothing, ``Σ_j w_j·z_j`` (all-reduce SUM, in float64).

Then every rank has ``lse = mx + log s`` and the same per-row loss as :class:`TorchBackend`
computes on the gathered logits, and writes the gradient of its own columns:
``p_j·a − (ε/V)·w_j − (1-ε)·w_y·[j = y]`` times the row's scale, ``a`` as there. float32 and
float64 logits keep their exponentials in the gradient buffer between the two passes (one
exponential per element); 16-bit logits, whose gradient buffer cannot hold them exactly, and
transformed logits (soft-cap, temperature) evaluate them again in the second pass.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .base import Backend, RowOptions, RowStats, acc_dtype, index_coef, index_loss
from .torch import chunk_elements, chunk_rows, index_grad_, row_scale, transform


class VocabParallelBackend(Backend):
    """Class-index cross entropy on this rank's columns ``[start, start + V_r)`` of ``total``
    classes, merged over ``group``."""

    name = "vocab_parallel"

    def __init__(self, group: dist.ProcessGroup | None, start: int, total: int) -> None:
        self.group = group
        self.start = start
        self.total = total

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
        dev = x.device
        lo, total, eps = self.start, self.total, opts.label_smoothing
        step = chunk_rows(m, v, chunk_elements(dev))

        # 1. the row max over every rank's columns
        mx = torch.full((m,), -torch.inf, dtype=acc, device=dev)
        if v:
            for r0 in range(0, m, step):
                r1 = min(m, r0 + step)
                mx[r0:r1] = transform(x[r0:r1].to(acc), opts)[0].amax(1)
        dist.all_reduce(mx, dist.ReduceOp.MAX, group=self.group)

        # 2. Σ exp(z), the target's z, Σ w·z: this rank's part, then everyone's
        keep = target != opts.ignore_index
        mine = keep & (target >= lo) & (target < lo + v)  # the target column is on this rank
        tl = torch.where(mine, target - lo, 0).unsqueeze(1)  # its local column (0 elsewhere)
        w = None if weight is None else weight.to(acc)
        w_local = None if w is None else w[lo : lo + v]
        keep_e = grad_out is not None and grad_out.dtype == acc and not opts.transformed
        parts = torch.zeros(3, m, dtype=torch.float64, device=dev)
        for r0 in range(0, m if v else 0, step):
            r1 = min(m, r0 + step)
            z = transform(x[r0:r1].to(acc), opts)[0] - mx[r0:r1].unsqueeze(1)
            e = torch.exp(z)
            parts[0, r0:r1] = e.sum(1, dtype=torch.float64)
            zt = z.gather(1, tl[r0:r1]).squeeze(1)
            parts[1, r0:r1] = torch.where(mine[r0:r1], zt, 0.0)
            if eps > 0.0:
                wz = z if w_local is None else z * w_local
                parts[2, r0:r1] = wz.sum(1, dtype=torch.float64)
            if keep_e:
                assert grad_out is not None
                grad_out[r0:r1] = e
        dist.all_reduce(parts, dist.ReduceOp.SUM, group=self.group)
        s, zt, wz = parts[0], parts[1], parts[2]

        # the row's loss, with TorchBackend.cross_entropy_forward's formula
        log_s = torch.log(s)
        tc = torch.where(keep, target, 0)  # ignored rows read class 0
        wt = torch.ones_like(s) if w is None else w[tc].double()  # the target's weight
        w_total = float(total) if w is None else w.double().sum()
        lse = mx.double() + log_s
        row = index_loss((log_s - zt) * wt, log_s * w_total - wz, eps, total, lse, opts.z_loss)
        loss = row.masked_fill(~keep, 0.0).to(acc)
        if grad_out is None:
            return RowStats(loss, lse.to(acc))

        # 3. the gradient of this rank's columns
        k_all = (index_coef(wt, eps, total, w_total, lse, opts.z_loss) / s).to(acc).unsqueeze(1)
        t_all = torch.where(mine, -(1.0 - eps) * wt, 0.0).to(acc).unsqueeze(1)  # off-rank: 0
        for r0 in range(0, m if v else 0, step):
            r1 = min(m, r0 + step)
            c = 1.0 if grad_scale is None else row_scale(grad_scale, r0, r1, acc)
            du = None
            if keep_e:
                e = grad_out[r0:r1]
            else:
                u, du = transform(x[r0:r1].to(acc), opts)
                e = torch.exp(u - mx[r0:r1].unsqueeze(1))
            grad_out[r0:r1] = index_grad_(
                e, k_all[r0:r1] * c, c, eps, total, w_local, tl[r0:r1], t_all[r0:r1] * c, du,
                keep[r0:r1].unsqueeze(1),
            )
        return RowStats(loss, lse.to(acc))
