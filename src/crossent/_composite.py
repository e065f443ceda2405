"""The public functions' values written with torch's own differentiable operations.

Used where crossent's kernels cannot follow a transform (:mod:`crossent._transforms`): under
torch.func transforms and forward-mode AD, and to build a differentiable gradient when
backward runs with ``create_graph=True``. Row-block forms, as the autograd Functions see the
problem: ``(M, V)`` logits, ``(M,)`` class indices or ``(M, V)`` probabilities.

The formulas are torch's for the plain arguments (``F.cross_entropy``, ``F.nll_loss``,
softmax) and the definitions of crossent's extensions (:class:`~crossent.backends.base.
RowOptions`): ``u = softcap·tanh(x / softcap) / temperature``, and ``z_loss·lse(u)²`` added to
each kept row's loss, reduced as the cross entropy is.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .backends.base import RowOptions, logit_transform


def transformed(x: Tensor, rows: RowOptions) -> Tensor:
    """The logits as the loss reads them."""
    return logit_transform(x, rows, derivative=False)[0]


def cross_entropy(
    x: Tensor, target: Tensor, weight: Tensor | None, rows: RowOptions, reduction: str,
    prob: bool,
) -> Tensor:  # fmt: skip
    """Cross entropy of a row block with crossent's extensions."""
    u = transformed(x, rows)
    eps = rows.label_smoothing
    if prob:
        loss = F.cross_entropy(u, target, weight, reduction=reduction, label_smoothing=eps)
    else:
        loss = F.cross_entropy(
            u, target, weight, ignore_index=rows.ignore_index, reduction=reduction,
            label_smoothing=eps,
        )  # fmt: skip
    if rows.z_loss == 0.0:
        return loss
    lse = torch.logsumexp(u, -1)
    z = rows.z_loss * lse * lse
    if prob:
        denom: Tensor | int = u.shape[0]
    else:
        keep = target != rows.ignore_index
        z = torch.where(keep, z, 0.0)
        if weight is None:
            denom = keep.sum()
        else:
            denom = torch.where(keep, weight[torch.where(keep, target, 0)], 0.0).sum()
    if reduction == "none":
        return loss + z.to(loss.dtype)
    total = z.sum()
    if reduction == "mean":
        total = total / denom
    return loss + total.to(loss.dtype)


def nll_loss(
    x: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, reduction: str
) -> Tensor:
    return F.nll_loss(x, target, weight, ignore_index=ignore_index, reduction=reduction)


def softmax(x: Tensor, log: bool) -> Tensor:
    return torch.log_softmax(x, -1) if log else torch.softmax(x, -1)


def token_stats(
    x: Tensor, target: Tensor, ignore_index: int, rows: RowOptions
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row log-probability of the target (0 where ignored), entropy, lse and argmax."""
    u = transformed(x, rows)
    lp = torch.log_softmax(u, -1)
    keep = target != ignore_index
    picked = lp.gather(-1, torch.where(keep, target, 0).unsqueeze(-1)).squeeze(-1)
    logprob = torch.where(keep, picked, torch.zeros_like(picked))
    entropy = -(lp.exp() * lp).sum(-1)
    lse = torch.logsumexp(u, -1)
    return logprob, entropy, lse.detach(), u.argmax(-1)


def gradients(
    outputs: Tensor | tuple[Tensor, ...], inputs: tuple[Tensor | None, ...],
    grads: Tensor | tuple[Tensor, ...], wanted: tuple[bool, ...],
) -> tuple[Tensor | None, ...]:  # fmt: skip
    """``d outputs / d inputs`` for the ``wanted`` inputs (None elsewhere), built with
    ``create_graph`` when grad mode is on (a second derivative will follow)."""
    take = [t for t, w in zip(inputs, wanted, strict=True) if w and t is not None]
    if not take:
        return tuple(None for _ in inputs)
    outs = (outputs,) if isinstance(outputs, Tensor) else outputs
    gs = (grads,) if isinstance(grads, Tensor) else grads
    pairs = [(o, g) for o, g in zip(outs, gs, strict=True) if o.requires_grad and g is not None]
    if not pairs:
        found: tuple[Tensor | None, ...] = tuple(None for _ in take)
    else:
        found = torch.autograd.grad(
            [o for o, _ in pairs], take, [g for _, g in pairs],
            create_graph=torch.is_grad_enabled(), allow_unused=True,
        )  # fmt: skip
    it = iter(found)
    res = [next(it) if w and t is not None else None for t, w in zip(inputs, wanted, strict=True)]
    return tuple(
        torch.zeros_like(t) if r is None and w and t is not None else r
        for r, t, w in zip(res, inputs, wanted, strict=True)
    )


def replay(fn, inputs: tuple[Tensor | None, ...], wanted: tuple[bool, ...]):
    """``fn(*inputs)`` with grad mode on, differentiable in the ``wanted`` inputs: those
    already in a graph stay in it when backward builds one (create_graph), the others are
    detached aliases that require grad (autograd.grad stops there)."""
    keep = torch.is_grad_enabled()
    leaves = tuple(
        t if t is None or (keep and t.requires_grad) else t.detach().requires_grad_(w)
        for t, w in zip(inputs, wanted, strict=True)
    )  # fmt: skip
    with torch.enable_grad():
        return fn(*leaves), leaves


def token_stats_grads(
    inputs: tuple[Tensor | None, ...], grads: tuple[Tensor, Tensor], rows: RowOptions,
    wanted: tuple[bool, ...],
) -> tuple[Tensor | None, ...]:  # fmt: skip
    """Gradients of the inputs of the token statistics, ``(x, target)`` of logits or
    ``(h, w, b, target)`` of a linear head, by torch's own operations: differentiable
    (create_graph) and batchable."""

    def stats(*ts: Any) -> tuple[Tensor, Tensor]:
        logits = ts[0] if len(ts) == 2 else F.linear(ts[0], ts[1], ts[2])
        lp, ent, _, _ = token_stats(logits, ts[-1], rows.ignore_index, rows)
        return lp, ent

    outs, leaves = replay(stats, inputs, wanted)
    return gradients(outs, leaves, grads, wanted)
