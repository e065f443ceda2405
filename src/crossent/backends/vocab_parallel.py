"""Cross entropy over logits whose classes are split across the ranks of a process group.

Rank ``r`` holds the columns ``[start, start + V_r)`` of every row; the targets (global class
indices, or this rank's columns of the probabilities) and the class weights (all ``V`` of them)
are the same on every rank. Each rank computes its slice's partial statistics with its local
backend (:meth:`~crossent.backends.base.Backend.cross_entropy_partial`: per row the slice's max,
its sum of exponentials, the target's logit where it is here, the smoothing sum), the ranks
exchange them in one all-gather of a ``(K, M)`` float64 tensor, and every rank merges all of
them in rank order (:func:`~crossent.backends.base.merge_index`): the same loss, bit for bit, on
every rank. Each rank then writes the gradient of its own columns from the merged statistics.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from .base import (
    Backend,
    Merged,
    RowOptions,
    RowStats,
    acc_dtype,
    merge_index,
    merge_prob,
    prob_acc_dtype,
)


class VocabParallelBackend(Backend):
    """Cross entropy on this rank's columns ``[start, start + V_r)`` of ``total`` classes,
    computed by ``local`` and merged over ``group``."""

    name = "vocab_parallel"
    distributed = True

    def __init__(
        self, group: dist.ProcessGroup | None, start: int, total: int, local: Backend
    ) -> None:
        self.group = group
        self.start = start
        self.total = total
        self.local = local

    def gather(self, parts: Tensor) -> Tensor:
        """Every rank's ``parts``, stacked in rank order: one collective."""
        world = dist.get_world_size(self.group)
        if world == 1:
            return parts.unsqueeze(0)
        out = torch.empty((world, *parts.shape), dtype=parts.dtype, device=parts.device)
        dist.all_gather(list(out.unbind(0)), parts.contiguous(), group=self.group)
        return out

    def cross_entropy_forward(
        self,
        x: Tensor,
        target: Tensor,
        weight: Tensor | None,
        opts: RowOptions,
        grad_out: Tensor | None = None,
        grad_scale: Tensor | None = None,
    ) -> RowStats:
        local = self.local
        return self._run(
            local.cross_entropy_partial, local.cross_entropy_partial_grad,
            lambda parts: merge_index(parts, target, weight, opts, self.total),
            acc_dtype(x.dtype), x, target, weight, opts, grad_out, grad_scale,
        )  # fmt: skip

    def cross_entropy_prob_forward(
        self,
        x: Tensor,
        target: Tensor,
        weight: Tensor | None,
        opts: RowOptions,
        grad_out: Tensor | None = None,
        grad_scale: Tensor | None = None,
    ) -> RowStats:
        local = self.local
        return self._run(
            local.cross_entropy_prob_partial, local.cross_entropy_prob_partial_grad,
            lambda parts: merge_prob(parts, opts), prob_acc_dtype(x, target, weight),
            x, target, weight, opts, grad_out, grad_scale,
        )  # fmt: skip

    def _run(
        self, partial: Callable[..., Tensor], partial_grad: Callable[..., None],
        merge: Callable[[Tensor], Merged], acc: torch.dtype, x: Tensor, target: Tensor,
        weight: Tensor | None, opts: RowOptions, grad_out: Tensor | None,
        grad_scale: Tensor | None,
    ) -> RowStats:  # fmt: skip
        """The local partial statistics, everyone's merged, then this slice's gradient."""
        lo, total = self.start, self.total
        merged = merge(self.gather(partial(x, target, weight, opts, lo, total)))
        if grad_out is not None:
            partial_grad(x, target, weight, opts, lo, total, merged, grad_out, grad_scale)
        return RowStats(merged.loss.to(acc), merged.lse.to(acc))
