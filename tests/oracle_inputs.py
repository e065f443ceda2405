"""Small helpers shared by the oracle test modules: float64 copies, shapes, incoming grads."""

from __future__ import annotations

import numpy as np
import torch

from crossent.testing import make_logits


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    """A float64 (or int64, for integer tensors) NumPy copy for the oracle; ``None`` passes."""
    if t is None:
        return None
    dt = torch.float64 if t.dtype.is_floating_point else torch.int64
    return t.detach().to(dt).numpy()


def grad_output_for(loss: torch.Tensor, reduction: str, seed: int = 0) -> torch.Tensor:
    """Non-uniform signed gradient for 'none'; 1 for 'mean' (the usual ``loss.backward()``,
    which crossent hands over without a multiply); 0.75 (exact in every dtype) for 'sum'."""
    if reduction == "none":
        return make_logits(tuple(loss.shape), loss.dtype, seed=seed + 11, scale=1.0)
    return torch.tensor(1.0 if reduction == "mean" else 0.75, dtype=loss.dtype)


def target_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The class-index target shape for an input shape: the class dim removed."""
    return () if len(shape) == 1 else shape[:1] + shape[2:]


def class_dim(shape: tuple[int, ...]) -> int:
    return 0 if len(shape) == 1 else 1
