"""What is measured: a :class:`Case` (family, shape, dtype) and the :class:`Family` that knows
how to build its inputs, each provider's callable, its traffic, its floor and its check.

Adding a case family (e.g. a fused linear cross entropy) is one subclass of :class:`Family`
in its own module, listed in :data:`FAMILY_MODULES`. The runner, worker and report never name a
family.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .providers import Provider

# Modules whose import registers families (in this order: it is also the order of the table).
FAMILY_MODULES: tuple[str, ...] = (
    "crossent.bench.logits", "crossent.bench.linear", "crossent.bench.llama",
)  # fmt: skip

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}
DEFAULT_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class Case:
    """One measured problem: ``family`` at ``shape`` in ``dtype`` (a name in :data:`DTYPES`)."""

    family: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def shape_text(self) -> str:
        return "x".join(str(s) for s in self.shape)

    @property
    def label(self) -> str:
        return f"{self.family} {self.shape_text}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_json(self) -> dict[str, Any]:
        return {"family": self.family, "shape": list(self.shape), "dtype": self.dtype}

    @staticmethod
    def from_json(d: dict[str, Any]) -> Case:
        return Case(str(d["family"]), tuple(int(s) for s in d["shape"]), str(d["dtype"]))


@dataclass
class Inputs:
    """Everything a provider's callable needs, allocated before the memory baseline is taken.

    ``args`` are passed positionally to every provider's callable; ``leaves`` are the tensors
    whose ``.grad`` backward produces (empty: forward only, as for a floor); ``grad_output`` is
    handed to ``backward`` (``None`` when the output is a scalar loss).
    """

    args: tuple[Any, ...]
    leaves: tuple[Tensor, ...] = ()
    grad_output: Tensor | None = None


@dataclass(frozen=True)
class Check:
    """Outcome of comparing one provider's output and gradient with the float64 oracle."""

    out_ok: bool
    grad_ok: bool | None  # None: nothing to compare (forward-only case)
    message: str = ""


class Family(ABC):
    """A family of cases: one operation (or floor) at several shapes and dtypes."""

    name: ClassVar[str]
    description: ClassVar[str]
    shapes: ClassVar[tuple[tuple[int, ...], ...]]  # default run
    quick_shapes: ClassVar[tuple[tuple[int, ...], ...]]  # --quick smoke test
    dtypes: ClassVar[tuple[str, ...]] = DEFAULT_DTYPES
    baseline: ClassVar[str] = "torch-eager"  # the provider the "× torch" column divides by
    listed: ClassVar[bool] = True  # False for floors: run only as some case's floor

    @abstractmethod
    def make_inputs(self, case: Case, seed: int = 0) -> Inputs:
        """Allocate the inputs of ``case`` (seeded, identical in every process)."""

    @abstractmethod
    def torch_fn(self, case: Case) -> Callable[..., Tensor]:
        """torch's own function (the eager baseline; ``torch.compile`` compiles this)."""

    @abstractmethod
    def crossent_fn(self, case: Case, backend: str) -> Callable[..., Tensor]:
        """crossent's function with ``backend=backend``."""

    def peer_fn(self, provider: Provider, case: Case) -> Callable[..., Tensor]:
        """A peer library's function; raise :class:`NotApplicable` when it has none."""
        raise NotApplicable(f"{provider.name} has no {self.name} function")

    def callable(self, provider: Provider, case: Case) -> Callable[..., Tensor]:
        """The function ``provider`` runs, called as ``fn(*inputs.args)``."""
        if provider.kind == "torch":
            return self.torch_fn(case)
        if provider.kind == "torch-compile":
            # Shapes are static within a case; compile time is excluded from the medians
            # (warm-up) and reported as the first call's time.
            return torch.compile(self.torch_fn(case), dynamic=False)
        if provider.kind == "crossent":
            return self.crossent_fn(case, provider.backend)
        return self.peer_fn(provider, case)

    @abstractmethod
    def min_bytes(self, case: Case) -> int:
        """Bytes that must move for forward+backward: each input read once, each output
        written once (the numerator of the GB/s column)."""

    def floor(self, case: Case) -> Case | None:
        """The case whose single provider's time is this case's floor (``None``: no floor)."""
        return None

    def providers(self, case: Case, available: Iterable[Provider]) -> list[Provider]:
        """The providers that apply to ``case``: all but floors and :meth:`not_applicable`."""
        skip = self.not_applicable()
        return [p for p in available if p.kind != "floor" and p.kind not in skip]

    def not_applicable(self) -> dict[str, str]:
        """Provider kind -> why this family leaves it out (listed under the table)."""
        return {}

    @abstractmethod
    def check(self, case: Case, inputs: Inputs, out: Tensor, full: bool = False) -> Check:
        """Compare ``out`` and the leaves' gradients with the float64 oracle, on every row when
        ``full``, else on a sample of rows where the case is large (losses: always all rows)."""


class NotApplicable(Exception):
    """A provider has no implementation of a family (recorded as a note, not an error)."""


_FAMILIES: dict[str, Family] = {}


def register(family: type[Family]) -> type[Family]:
    """Class decorator: make ``family`` known to the harness under ``family.name``."""
    _FAMILIES[family.name] = family()
    return family


def families() -> dict[str, Family]:
    """Every registered family, in table order."""
    for module in FAMILY_MODULES:
        importlib.import_module(module)
    return dict(_FAMILIES)


def family(name: str) -> Family:
    return families()[name]


def parse_dtypes(text: str | None) -> tuple[str, ...] | None:
    """``"fp32,bf16"`` -> ``("float32", "bfloat16")``; ``None`` -> ``None`` (family default)."""
    if text is None:
        return None
    out = []
    for tok in (t.strip().lower() for t in text.split(",") if t.strip()):
        name = DTYPE_ALIASES.get(tok, tok)
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {tok!r}; choose from {', '.join(DTYPES)}")
        out.append(name)
    return tuple(out)


def _parse_shape(text: str) -> tuple[int, ...] | None:
    parts = text.lower().split("x")
    if len(parts) < 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        return None
    return tuple(int(p) for p in parts)


def select_cases(filters: str | None, dtypes: tuple[str, ...] | None, quick: bool) -> list[Case]:
    """The cases to run, in table order.

    ``filters`` is a comma-separated list; a case is kept when any token matches: a family
    name (``ce``, ``softmax``, ``log_softmax``), a shape (``4096x32000``), or
    ``FAMILY:SHAPE``, which also adds that shape when it is not a default one.
    """
    fams = {n: f for n, f in families().items() if f.listed}
    tokens = [t.strip() for t in (filters or "").split(",") if t.strip()]
    extra: list[tuple[str, tuple[int, ...]]] = []
    for tok in tokens:
        name, _, shape_text = tok.partition(":")
        if name not in fams and _parse_shape(name) is None:
            raise ValueError(
                f"--cases: {tok!r} is neither a family ({', '.join(fams)}) nor a shape "
                "like 4096x32000 nor FAMILY:SHAPE"
            )
        if shape_text:
            shape = _parse_shape(shape_text)
            if shape is None:
                raise ValueError(f"--cases: bad shape {shape_text!r} in {tok!r}")
            extra.append((name, shape))

    def keep(c: Case) -> bool:
        return not tokens or any(
            t in (c.family, c.shape_text, f"{c.family}:{c.shape_text}") for t in tokens
        )

    cases: list[Case] = []
    for fam in fams.values():
        shapes = list(fam.quick_shapes if quick else fam.shapes)
        shapes += [s for n, s in extra if n == fam.name and s not in shapes]
        for shape in shapes:
            for dt in dtypes or fam.dtypes:
                c = Case(fam.name, shape, dt)
                if keep(c):
                    cases.append(c)
    return cases
