"""The tolerance rule and input makers shared by the tests, ``crossent check`` and the benchmarks.

**The rule.** A result is measured against the float64 oracle (:mod:`crossent.reference`). It
passes when, element by element,

    |ours - oracle| <= max |torch - oracle| + atol(dtype) + rtol(dtype)·|oracle|

where ``torch`` is torch's own result in the same dtype (left out when there is none) and
``atol``/``rtol`` are a small per-dtype floor: a couple of units in the last place. Non-finite
values must sit at the same positions, with the same value (NaN, +inf or -inf), as in the
oracle, or else as in torch's own result. The rule is never loosened to get a test green.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# Per-dtype floors (atol, rtol): about two units in the last place of a value of magnitude 1.
FLOORS: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (2.5e-7, 1e-6),
    torch.bfloat16: (2e-3, 1.6e-2),
    torch.float16: (2.5e-4, 2e-3),
}


@dataclass(frozen=True)
class Verdict:
    """Outcome of one comparison: ``ok``, and the max abs and rel errors against the oracle."""

    ok: bool
    max_abs: float
    max_rel: float
    allowed_abs: float
    message: str


def _f64(a: Tensor | np.ndarray | float) -> np.ndarray:
    if isinstance(a, Tensor):
        return a.detach().to("cpu", torch.float64).numpy()
    return np.asarray(a, dtype=np.float64)


def compare(
    actual: Tensor,
    oracle: Tensor | np.ndarray,
    torch_actual: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> Verdict:
    """Apply the tolerance rule (module docstring) and return a :class:`Verdict`."""
    dtype = dtype or actual.dtype
    atol, rtol = FLOORS.get(dtype, FLOORS[torch.float32])
    a, r = _f64(actual), _f64(oracle)
    if a.shape != r.shape:
        return Verdict(False, np.inf, np.inf, 0.0, f"shape {a.shape} != oracle shape {r.shape}")
    t = None if torch_actual is None else _f64(torch_actual)
    fin_r = np.isfinite(r)
    same_nonfinite = _same_nonfinite(a, r)
    if not same_nonfinite and (t is None or not _same_nonfinite(a, t)):
        bad = np.argwhere(~(np.isfinite(a) == fin_r) | (~fin_r & ~_eq_nan(a, r)))
        where = tuple(bad[0]) if bad.size else ()
        return Verdict(
            False, np.inf, np.inf, 0.0,
            f"non-finite mismatch at {where}: got {a[where] if bad.size else a}, "
            f"oracle {r[where] if bad.size else r}",
        )
    mask = np.isfinite(a) & fin_r
    if t is not None:
        mask &= np.isfinite(t)
    err = np.abs(a[mask] - r[mask])
    torch_err = float(np.abs(t[mask] - r[mask]).max()) if t is not None and err.size else 0.0
    allowed = torch_err + atol + rtol * np.abs(r[mask])
    max_abs = float(err.max()) if err.size else 0.0
    rel = err / np.maximum(np.abs(r[mask]), np.finfo(np.float64).tiny)
    max_rel = float(rel.max()) if err.size else 0.0
    ok = bool(np.all(err <= allowed))
    msg = ""
    if not ok:
        i = int(np.argmax(err - allowed))
        msg = (
            f"error {err[i]:.3e} > allowed {allowed[i]:.3e} (torch's own max error "
            f"{torch_err:.3e}, floor atol={atol:g} rtol={rtol:g}) at flat index {i}"
        )
    return Verdict(ok, max_abs, max_rel, float(allowed.max()) if err.size else 0.0, msg)


def _eq_nan(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a == b) | (np.isnan(a) & np.isnan(b))


def _same_nonfinite(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    na, nb = ~np.isfinite(a), ~np.isfinite(b)
    return bool(np.array_equal(na, nb) and np.all(_eq_nan(a[na], b[nb])))


def assert_close_to_oracle(
    actual: Tensor,
    oracle: Tensor | np.ndarray,
    torch_actual: Tensor | None = None,
    dtype: torch.dtype | None = None,
    what: str = "",
) -> None:
    """Raise ``AssertionError`` when :func:`compare` fails."""
    v = compare(actual, oracle, torch_actual, dtype)
    if not v.ok:
        raise AssertionError(f"{what}: {v.message}" if what else v.message)


# --------------------------------------------------------------------------------------------
# input makers


def make_logits(
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    scale: float = 3.0,
    requires_grad: bool = False,
) -> Tensor:
    """Normal logits times ``scale``, rounded to ``dtype`` (seeded, CPU)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    return x.requires_grad_(requires_grad)


def make_targets(
    shape: tuple[int, ...],
    num_classes: int,
    seed: int = 0,
    ignore_index: int | None = None,
    ignore_fraction: float = 0.0,
) -> Tensor:
    """Class indices in ``[0, C)``; a fraction of them set to ``ignore_index`` if given."""
    g = torch.Generator().manual_seed(seed + 1)
    t = torch.randint(0, max(num_classes, 1), shape, generator=g)
    if ignore_index is not None and ignore_fraction > 0:
        drop = torch.rand(shape, generator=g) < ignore_fraction
        t = t.masked_fill(drop, ignore_index)
    return t


def make_probs(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> Tensor:
    """Rows of a softmax over ``dim=1`` (or 0 for 1-D): valid probability targets."""
    g = torch.Generator().manual_seed(seed + 2)
    dim = 0 if len(shape) == 1 else 1
    return torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), dim).to(dtype)


def make_weight(num_classes: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> Tensor:
    """Positive class weights in ``[0.5, 2)``."""
    g = torch.Generator().manual_seed(seed + 3)
    return (0.5 + 1.5 * torch.rand(num_classes, generator=g, dtype=torch.float64)).to(dtype)
