"""``crossent check``: every available backend against the float64 oracle on a standard case set.

For each backend, function, case and dtype it evaluates the value and the input gradient,
applies the tolerance rule of :mod:`crossent.testing` (torch's own error in the same dtype
plus a per-dtype floor) and prints one PASS/FAIL row with the max abs and rel errors.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np
import torch
import torch.nn.functional as F

from . import _args, _composite, dispatch, functional
from . import reference as ref
from .backends.base import RowOptions
from .testing import compare, make_logits, make_probs, make_targets, make_weight


@dataclass(frozen=True)
class Case:
    """One check: a function, its inputs (made per dtype) and its oracle."""

    function: str
    label: str
    make: Callable[[torch.dtype], tuple[tuple[Any, ...], dict[str, Any]]]
    oracle: Callable[..., tuple[np.ndarray, np.ndarray]]
    #: torch's side of the tolerance rule when torch has no such function or option
    torch_fn: Callable[..., torch.Tensor] | None = None


def composed_cross_entropy(
    x: torch.Tensor, t: torch.Tensor, weight: torch.Tensor | None = None,
    ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
    z_loss: float = 0.0, softcap: float | None = None, temperature: float = 1.0,
) -> torch.Tensor:
    """crossent's extended cross entropy (2-D logits; class indices, or probabilities when
    ``t`` has the logits' shape) from torch ops in the input dtype: torch's own error for
    options torch does not have (the composite form crossent uses under torch.func)."""
    rows = RowOptions(
        ignore_index=ignore_index, label_smoothing=_args.effective_smoothing(label_smoothing),
        z_loss=z_loss, softcap=softcap, temperature=temperature,
    )  # fmt: skip
    return _composite.cross_entropy(x, t, weight, rows, reduction, t.shape == x.shape)


def _np(t: Any) -> Any:
    if isinstance(t, torch.Tensor):
        return t.detach().to(torch.float64 if t.dtype.is_floating_point else torch.int64).numpy()
    return t


def _ce_oracle(x: Any, t: Any, g: np.ndarray, **kw: Any) -> tuple[np.ndarray, np.ndarray]:
    kw = {k: _np(v) for k, v in kw.items()}
    return (
        ref.cross_entropy(_np(x), _np(t), **kw),
        ref.cross_entropy_grad(_np(x), _np(t), g, **kw).input,
    )


def _nll_oracle(x: Any, t: Any, g: np.ndarray, **kw: Any) -> tuple[np.ndarray, np.ndarray]:
    kw = {k: _np(v) for k, v in kw.items()}
    return ref.nll_loss(_np(x), _np(t), **kw), ref.nll_loss_grad(_np(x), _np(t), g, **kw)


def _softmax_oracle(log: bool) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    def oracle(x: Any, g: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
        if log:
            return ref.log_softmax(_np(x), dim), ref.log_softmax_grad(_np(x), dim, g)
        return ref.softmax(_np(x), dim), ref.softmax_grad(_np(x), dim, g)

    return oracle


def standard_cases() -> list[Case]:
    """Irregular sizes (V not a power of two), every option, a large-logit batch."""
    n, v = 37, 1000
    w = make_weight(v, torch.float64)

    def ce(**kw: Any) -> Callable[[torch.dtype], tuple[tuple[Any, ...], dict[str, Any]]]:
        def make(dt: torch.dtype) -> tuple[tuple[Any, ...], dict[str, Any]]:
            x = make_logits((n, v), dt, seed=1)
            t = make_targets((n,), v, seed=1, ignore_index=-100, ignore_fraction=0.2)
            extra = {k: a.to(dt) if isinstance(a, torch.Tensor) else a for k, a in kw.items()}
            return (x, t), extra

        return make

    def ce_probs(dt: torch.dtype) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (make_logits((n, v), dt, seed=2), make_probs((n, v), dt, seed=2)), {
            "label_smoothing": 0.1
        }

    def ce_kdim(dt: torch.dtype) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (make_logits((3, 11, 5, 7), dt, seed=3), make_targets((3, 5, 7), 11, seed=3)), {
            "reduction": "none"
        }

    def ce_large(dt: torch.dtype) -> tuple[tuple[Any, ...], dict[str, Any]]:
        x = torch.tensor([[1000.0, 999.0, 998.0], [1005.0, 1002.0, 1000.0]], dtype=dt)
        return (x, torch.tensor([0, 0])), {}

    def nll(dt: torch.dtype) -> tuple[tuple[Any, ...], dict[str, Any]]:
        x = torch.log_softmax(make_logits((n, v), torch.float64, seed=4), 1).to(dt)
        t = make_targets((n,), v, seed=4, ignore_index=-100, ignore_fraction=0.2)
        return (x, t), {"weight": w.to(dt)}

    def sm(dt: torch.dtype) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (make_logits((n, v), dt, seed=5),), {"dim": 1}

    def sm_dim0(dt: torch.dtype) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (make_logits((19, 5, 23), dt, seed=6),), {"dim": 0}

    smooth = ce(weight=w, label_smoothing=0.1)
    extended = ce(weight=w, label_smoothing=0.1, z_loss=1e-3, softcap=4.0, temperature=0.8)
    return [
        Case("cross_entropy", "index targets", ce(), _ce_oracle),
        Case("cross_entropy", "weights+smoothing+ignore", smooth, _ce_oracle),
        Case("cross_entropy", "sum, weights", ce(weight=w, reduction="sum"), _ce_oracle),
        Case("cross_entropy", "probability targets", ce_probs, _ce_oracle),
        Case("cross_entropy", "(N,C,d1,d2), none", ce_kdim, _ce_oracle),
        Case("cross_entropy", "logits ~1e3", ce_large, _ce_oracle),
        Case("cross_entropy", "z-loss+softcap+temperature", extended, _ce_oracle,
             composed_cross_entropy),
        Case("nll_loss", "weights+ignore", nll, _nll_oracle),
        Case("softmax", "dim=1", sm, _softmax_oracle(False)),
        Case("softmax", "dim=0 of 3-D", sm_dim0, _softmax_oracle(False)),
        Case("log_softmax", "dim=1", sm, _softmax_oracle(True)),
        Case("log_softmax", "dim=0 of 3-D", sm_dim0, _softmax_oracle(True)),
    ]


def _run(
    fn: Callable[..., torch.Tensor], args: tuple[Any, ...], kw: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Value and input gradient of ``fn``, for a seeded non-uniform grad_output."""
    x = args[0].detach().clone().requires_grad_(True)
    out = fn(x, *args[1:], **kw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    g = g.to(out.dtype)
    (gx,) = torch.autograd.grad(out, x, g)
    return out, gx, g


def _check_one(
    backend: str, case: Case, dt: torch.dtype
) -> tuple[bool, tuple[float, float, float], str]:
    args, kw = case.make(dt)
    ours = getattr(functional, case.function)
    t_out, t_gx, g = _run(case.torch_fn or getattr(F, case.function), args, kw)
    o_out, o_gx, _ = _run(lambda *a, **k: ours(*a, backend=backend, **k), args, kw)
    ref_out, ref_gx = case.oracle(*args, _np(g), **kw)
    v_val = compare(o_out, ref_out, t_out)
    v_grad = compare(o_gx, ref_gx, t_gx)
    ok = v_val.ok and v_grad.ok and o_out.dtype == t_out.dtype
    note = "" if ok else (v_val.message or v_grad.message or "dtype differs from torch's")
    return ok, (v_val.max_abs, v_grad.max_abs, v_grad.max_rel), note


def run_check(file: TextIO = sys.stdout, backends: tuple[str, ...] | None = None) -> int:
    """Print the PASS/FAIL table; return 0 when every row passes, else 1."""
    backends = backends or dispatch.available()
    dtypes = (torch.float32, torch.bfloat16, torch.float64)
    header = (
        f"| {'backend':<9} | {'function':<13} | {'case':<26} | {'dtype':<8} | "
        f"{'value max abs':>13} | {'grad max abs':>12} | {'grad max rel':>12} | result |"
    )
    print(header, file=file)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|", file=file)
    failures = 0
    for name in backends:
        for case in standard_cases():
            for dt in dtypes:
                try:
                    ok, row, note = _check_one(name, case, dt)
                except Exception as exc:  # a crash is a failure, reported in the table
                    ok, row, note = False, (float("nan"),) * 3, f"{type(exc).__name__}: {exc}"
                failures += not ok
                dname = str(dt).replace("torch.", "")
                print(
                    f"| {name:<9} | {case.function:<13} | {case.label:<26} | {dname:<8} | "
                    f"{row[0]:>13.2e} | {row[1]:>12.2e} | {row[2]:>12.2e} | "
                    f"{'PASS' if ok else 'FAIL':<6} |" + (f" {note}" if note else ""),
                    file=file,
                )
    total = len(backends) * len(standard_cases()) * len(dtypes)
    print(f"\n{total - failures} passed, {failures} failed", file=file)
    print_fallbacks(file, backends)
    return 0 if failures == 0 else 1


def print_fallbacks(file: TextIO, backends: tuple[str, ...]) -> None:
    """The primitives each backend runs itself, and those the portable torch backend runs for
    it (``crossent.dispatch.fallback_table``)."""
    rows = [r for r in dispatch.fallback_table() if r[0] in backends]
    print(f"\n| {'backend':<9} | {'primitive':<31} | runs on |", file=file)
    print(f"|{'-' * 11}|{'-' * 33}|---------|", file=file)
    for name, primitive, how in rows:
        print(f"| {name:<9} | {primitive:<31} | {how} |", file=file)
