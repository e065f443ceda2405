"""The numeric primitives every backend implements, on 2-D row blocks.

A *row block* is a ``(M, V)`` tensor: ``M`` rows (samples, tokens, spatial positions) by
``V`` classes, classes contiguous. Everything above the backends (argument checks, legacy
arguments, K-dimensional inputs, reductions, autograd) is written once in
``crossent.functional`` and ``crossent._autograd``; a backend only computes per-row numbers.

Dtypes: logits may be float16, bfloat16, float32 or float64. Per-row results (loss, lse) are
returned in the *accumulation dtype*, :func:`acc_dtype` of the logits: float64 for float64,
float32 otherwise. Gradients are written in the dtype of the buffer the caller passes.

A backend may be asked to write the gradient of the per-row loss into ``grad_out`` during the
forward pass (the fused form: one pass over the logits computes loss and gradient). The
gradient written is ``grad_scale * d(loss_row)/dx`` with exact zeros on ignored rows, so that a
``'mean'`` or ``'sum'`` reduction needs nothing more in backward than a multiplication by the
incoming gradient. ``grad_out`` may alias ``x`` (the logits are overwritten by their
gradient); implementations must read each element before writing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for logits of ``dtype``: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class RowOptions:
    """Per-row options of the cross-entropy primitives.

    ``ignore_index``: rows whose target equals it get loss 0 and gradient 0 (class-index
    targets only). ``label_smoothing``: ``ε`` in ``[0, 1]``; already 0 when the user's value
    was not ``> 0``. Extensions (off by default): the logits are read as
    ``u = softcap·tanh(x / softcap)`` when ``softcap`` is set, then ``u / temperature``; each
    kept row's loss gains ``z_loss·lse(u)²``; ``lse`` is that of ``u``.
    """

    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    temperature: float = 1.0

    @property
    def transformed(self) -> bool:
        """Whether the logits are soft-capped or scaled before the cross entropy."""
        return self.softcap is not None or self.temperature != 1.0

    @property
    def extended(self) -> bool:
        """Whether any extension is on."""
        return self.transformed or self.z_loss != 0.0


class RowStats(NamedTuple):
    """Per-row results of a cross-entropy forward: both ``(M,)`` in the accumulation dtype."""

    loss: Tensor
    lse: Tensor


class Backend:
    """Interface of a backend. Subclasses implement every method below.

    Shapes: ``x`` ``(M, V)``; index ``target`` ``(M,)`` int64 already range-checked (every
    value is in ``[0, V)`` or equals ``ignore_index``); probability ``target`` ``(M, V)``
    floating; ``weight`` ``(V,)`` or ``None``.
    """

    name: str = "base"
    # whether cross_entropy_columns works in place, with no buffer and no transposition
    columns_in_place: bool = False

    def softmax_forward(self, x: Tensor, log: bool) -> Tensor:
        """Return ``softmax(x, -1)`` (or ``log_softmax``), ``(M, V)`` in ``x``'s dtype."""
        raise NotImplementedError

    def softmax_backward(self, grad: Tensor, out: Tensor, log: bool) -> Tensor:
        """Return the gradient of the input of :meth:`softmax_forward` given its output."""
        raise NotImplementedError

    def cross_entropy_forward(
        self,
        x: Tensor,
        target: Tensor,
        weight: Tensor | None,
        opts: RowOptions,
        grad_out: Tensor | None = None,
        grad_scale: Tensor | None = None,
    ) -> RowStats:
        """Per-row cross entropy with class-index targets (optionally writing the gradient).

        ``loss[n] = (1-ε)·w[y]·(lse - x[n,y]) + (ε/V)·Σ_c w_c·(lse - x[n,c])``, 0 where
        ``y == ignore_index``. ``grad_scale`` is a 0-d tensor, or an ``(M,)`` tensor of per-row
        scales (``None`` means 1).
        """
        raise NotImplementedError

    def cross_entropy_prob_forward(
        self,
        x: Tensor,
        target: Tensor,
        weight: Tensor | None,
        opts: RowOptions,
        grad_out: Tensor | None = None,
        grad_scale: Tensor | None = None,
    ) -> RowStats:
        """Per-row cross entropy with probability targets.

        ``t' = (1-ε)·t + ε/V``; ``loss[n] = -Σ_c w_c·t'[n,c]·(x[n,c] - lse)``. Computed in
        float64 if any of ``x``, ``target``, ``weight`` is float64, else float32.
        """
        raise NotImplementedError

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
        """Gradients of probability-target cross entropy with respect to target and weight.

        ``row_grad`` ``(M,)`` is the incoming gradient of each row's loss. Returns
        ``(d_target (M, V) in target's dtype, d_weight (V,) in weight's dtype)``, each
        ``None`` when not wanted.
        """
        raise NotImplementedError

    def nll_forward(
        self, x: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int
    ) -> Tensor:
        """Per-row ``-w[y]·x[n, y]``, 0 where ignored, ``(M,)`` in the accumulation dtype."""
        raise NotImplementedError

    def nll_backward(
        self,
        row_grad: Tensor,
        target: Tensor,
        weight: Tensor | None,
        ignore_index: int,
        num_classes: int,
        dtype: torch.dtype,
    ) -> Tensor:
        """Gradient ``(M, V)`` of :meth:`nll_forward`: ``-w[y]·row_grad[n]`` at ``(n, y)``."""
        raise NotImplementedError

    def cross_entropy_columns(
        self,
        xt: Tensor,
        target: Tensor,
        weight: Tensor | None,
        opts: RowOptions,
        grad_scale: Tensor | None,
        chunk_rows: int,
        want_grad: bool = True,
    ) -> Tensor:
        """:meth:`cross_entropy_forward` of the rows of ``xt.T`` (``xt``: ``(V, M)``, the logits
        of M rows transposed, rows contiguous), the gradient written over ``xt`` when
        ``want_grad``; returns the ``(M,)`` losses. ``grad_scale``: one value or one per row.
        Here: ``chunk_rows`` rows at a time, transposed into a buffer and back (see
        :attr:`columns_in_place`)."""
        v, n = xt.shape
        loss = torch.empty(n, dtype=acc_dtype(xt.dtype), device=xt.device)
        buf = torch.empty((min(chunk_rows, n), v), dtype=xt.dtype, device=xt.device)
        for lo in range(0, n, chunk_rows):
            hi = min(lo + chunk_rows, n)
            rows = buf[: hi - lo]
            rows.copy_(xt[:, lo:hi].t())
            sc = grad_scale
            if sc is not None and sc.numel() > 1:
                sc = sc[lo:hi]
            grad = rows if want_grad else None
            stats = self.cross_entropy_forward(rows, target[lo:hi], weight, opts, grad, sc)
            loss[lo:hi] = stats.loss
            if want_grad:
                xt[:, lo:hi].copy_(rows.t())
        return loss
