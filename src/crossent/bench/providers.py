"""Who is measured: crossent's backends, torch eager, torch.compile, and peers where they run.

A :class:`Provider` is only a name and a kind; each case family turns it into a callable
(:meth:`crossent.bench.cases.Family.callable`). crossent's backends are discovered from
:func:`crossent.dispatch.available`, so a newly registered backend (e.g. the fused numba
``"cpu"``) is benchmarked without touching this harness.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Provider:
    """``name`` is what the table shows and ``--providers`` matches; ``kind`` says how the
    callable is built; ``backend`` is crossent's ``backend=`` (kind ``"crossent"`` only)."""

    name: str
    kind: str
    backend: str = ""
    about: str = ""  # a few words for notes
    reuse: bool = False  # crossent with its buffer reuse switched on (set_buffer_reuse)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "backend": self.backend, "about": self.about,
            "reuse": self.reuse,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> Provider:
        return Provider(
            d["name"], d["kind"], d.get("backend", ""), d.get("about", ""), d.get("reuse", False)
        )

    def matches(self, token: str) -> bool:
        """``--providers`` matching: the full name, a dash-prefix of it, or the kind."""
        return token in (self.name, self.kind) or self.name.startswith(token + "-")


TORCH_EAGER = Provider("torch-eager", "torch")
TORCH_COMPILE = Provider("torch-compile", "torch-compile")
FLOOR = Provider("floor", "floor")  # torch.exp into a preallocated output
FLOOR_ALLOC = Provider("floor-alloc", "floor", about="same, allocating its output")


def crossent_providers(dtype: torch.dtype) -> list[Provider]:
    """``crossent-auto`` (and ``crossent-auto-reuse``, the same with its buffers kept between
    calls: :func:`crossent.set_buffer_reuse`), plus ``crossent-NAME`` for every other backend
    ``auto`` does not pick for a CPU tensor of ``dtype`` (the float64 ``reference`` backend is
    an oracle, not a contender, and is left out, as is ``triton``, which runs CPU tensors only
    in Triton's interpreter)."""
    from crossent import dispatch

    try:
        picked = dispatch.auto_name(torch.empty(0, dtype=dtype))
    except Exception:  # a future auto_name may refuse a dtype; list every backend then
        picked = ""
    out = [
        Provider("crossent-auto", "crossent", "auto"),
        Provider(
            "crossent-auto-reuse", "crossent", "auto", "buffer reuse on", reuse=True
        ),
    ]
    out += [
        Provider(f"crossent-{name}", "crossent", name)
        for name in dispatch.available()
        if name not in ("reference", "triton", picked)
    ]
    return out


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def peer_providers() -> tuple[list[Provider], dict[str, str]]:
    """Peers that can run here, and for each that cannot, its kind -> why."""
    found: list[Provider] = []
    notes: dict[str, str] = {}
    if not _installed("liger_kernel"):
        notes["liger-kernel"] = "liger-kernel: not installed (its kernels need CUDA)"
    else:
        # Liger's kernels are Triton programs for CUDA devices; this harness times CPU tensors.
        notes["liger-kernel"] = "liger-kernel: installed, but its Triton kernels need CUDA"
    if _installed("cut_cross_entropy"):
        found.append(Provider("cut-cross-entropy", "cut-cross-entropy"))
    else:
        notes["cut-cross-entropy"] = "cut-cross-entropy: not installed"
    return found, notes


def candidates(dtype: torch.dtype) -> tuple[list[Provider], dict[str, str]]:
    """Every provider that could run a case of ``dtype`` (families then drop those that do not
    apply), and notes on peers that cannot run on this machine, by kind."""
    peers, notes = peer_providers()
    return [*crossent_providers(dtype), TORCH_EAGER, TORCH_COMPILE, *peers], notes
