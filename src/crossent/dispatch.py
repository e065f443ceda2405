"""Backend resolution: ``resolve(backend, tensor) -> Backend``.

``backend="auto"`` picks per call from the tensor's device, and hands small CPU problems to
torch's own functions (:func:`hands_off`, asked by :mod:`crossent.functional`). Nothing is
chosen, imported or queried at import time, and a backend that cannot run raises instead of
falling back.
A backend's missing primitives, and the inputs it declines, go to the portable torch backend
here and nowhere else (:class:`Composed`; ``crossent check`` prints :func:`fallback_table`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any, Literal

from torch import Tensor

from .backends.base import Backend, Unsupported

BackendName = Literal["auto", "cpu", "torch", "triton", "reference"]

# name -> (module, class). Modules are imported on first use only.
REGISTRY: dict[str, tuple[str, str]] = {
    "cpu": ("crossent.backends.cpu", "CpuBackend"),
    "torch": ("crossent.backends.torch", "TorchBackend"),
    "triton": ("crossent.backends.triton", "TritonBackend"),
    "reference": ("crossent.backends.reference", "ReferenceBackend"),
}
_INSTANCES: dict[str, Backend] = {}


def triton_usable() -> bool:
    """Whether the ``triton`` backend can run here: Triton installed, and a CUDA device or
    Triton's interpreter (``TRITON_INTERPRET=1``, which runs the kernels on CPU tensors)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        return True
    import torch

    return torch.cuda.is_available()


def available() -> tuple[str, ...]:
    """Names accepted by ``backend=`` (besides ``"auto"``) that can run here."""
    return tuple(n for n in REGISTRY if n != "triton" or triton_usable())


# backend="auto" calls torch's own CPU function on problems below these sizes: there a call
# into the fused kernels costs more in fixed overhead (argument handling, the autograd
# Function, the threads' start: a few hundred microseconds) than it saves, and torch's
# softmax runs from cache on inputs that fit in it. Crossovers measured on a 2-core AVX-512
# machine (fwd+bwd, float32): cross entropy between 256K and 512K logits (nll_loss uses the
# same bound); softmax and log_softmax between 32 and 64 MiB of input.
NATIVE_CE_ELEMENTS = 1 << 19
NATIVE_SOFTMAX_BYTES = 48 << 20


def hands_off(function: str, input: Tensor) -> bool:
    """Whether ``backend="auto"`` hands a call of ``function`` (``"cross_entropy"``,
    ``"nll_loss"``, ``"softmax"``, ``"log_softmax"``) on ``input`` to torch's own function.
    The rule sees sizes and the device only; the caller hands off only calls torch's function
    can compute (crossent's extensions at their defaults).

    Off the CPU every such call goes to torch: there ``"auto"`` would run the portable torch
    backend (the Triton kernels are not picked before they have been measured on a GPU), and
    torch's own CUDA kernels are faster than it (4096×32000 float32 forward+backward on an
    H200: 1.1 ms against 3.7 ms). Calls with crossent's options, and the linear head, still
    run the portable backend there, which keeps its memory advantage."""
    if input.device.type != "cpu":
        return function in ("softmax", "log_softmax", "cross_entropy", "nll_loss")
    if function in ("softmax", "log_softmax"):
        small = input.numel() * input.element_size() < NATIVE_SOFTMAX_BYTES
    elif function in ("cross_entropy", "nll_loss"):
        small = input.numel() < NATIVE_CE_ELEMENTS
    else:
        return False
    return small


def auto_name(tensor: Tensor) -> str:
    """The backend ``"auto"`` selects for ``tensor``: fused kernels on CPU, else portable torch."""
    return "cpu" if tensor.device.type == "cpu" else "torch"


# The primitives a backend may lack; dispatch gives those the portable backend's. (The
# interface's cross_entropy_columns is written from cross_entropy_forward: every backend has it.)
PRIMITIVES = (
    "softmax_forward",
    "softmax_backward",
    "cross_entropy_forward",
    "cross_entropy_prob_forward",
    "cross_entropy_prob_extra_grads",
    "nll_forward",
    "nll_backward",
    "cross_entropy_partial",
    "cross_entropy_partial_grad",
    "cross_entropy_prob_partial",
    "cross_entropy_prob_partial_grad",
    "token_stats_forward",
    "token_stats_backward",
)
PORTABLE = "torch"  # the fallback: runs every primitive on any device


def native(backend: Backend) -> frozenset[str]:
    """The primitives ``backend``'s own class implements."""
    cls = type(backend)
    return frozenset(p for p in PRIMITIVES if getattr(cls, p) is not getattr(Backend, p))


class Composed(Backend):
    """A backend's own primitives, and the portable backend's where it has none or declines an
    input (raising :class:`~crossent.backends.base.Unsupported`): the one place where one
    backend stands in for another. :func:`fallback_table` lists what each backend delegates."""

    def __init__(self, own: Backend, portable: Backend | None) -> None:
        self.own = own
        self.portable = portable
        self.name = own.name
        self.columns_in_place = own.columns_in_place
        self.distributed = own.distributed
        mine = native(own)
        for p in PRIMITIVES:
            setattr(self, p, self._route(p, p in mine))

    def _route(self, primitive: str, mine: bool) -> Any:
        own = getattr(self.own, primitive)
        if self.portable is None:
            return own
        theirs = getattr(self.portable, primitive)
        if not mine:
            return theirs
        if primitive not in self.own.defers:  # declines nothing (Unsupported would propagate)
            return own

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return own(*args, **kwargs)
            except Unsupported:
                return theirs(*args, **kwargs)

        return call

    def cross_entropy_columns(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.own.cross_entropy_columns(*args, **kwargs)

    def scale_(self, t: Any, g: Any) -> Any:
        return self.own.scale_(t, g)

    # the linear head's matmul policy: the backend's own
    @property
    def product_slice_bytes(self) -> int:  # type: ignore[override]
        return self.own.product_slice_bytes

    def widened_products(self, dtype: Any) -> bool:
        return self.own.widened_products(dtype)

    @property
    def narrow_sums(self) -> bool:  # type: ignore[override]
        return self.own.narrow_sums

    def add_narrow(self, *args: Any) -> None:
        self.own.add_narrow(*args)


def fallback_table() -> list[tuple[str, str, str]]:
    """``(backend, primitive, how)`` for every registered backend and primitive: ``native``,
    ``native; <inputs> -> torch`` where the backend declines some inputs, or ``torch``."""
    rows = []
    for name, (module, cls) in REGISTRY.items():
        try:
            klass = getattr(importlib.import_module(module), cls)
        except ImportError:  # triton not installed: nothing to list
            continue
        defers = klass.defers
        for p in PRIMITIVES:
            if getattr(klass, p) is getattr(Backend, p):
                how = PORTABLE
            elif p in defers:
                how = f"native; {defers[p]} -> {PORTABLE}"
            else:
                how = "native"
            rows.append((name, p, how))
    return rows


def resolve(backend: str, tensor: Tensor) -> Backend:
    """Return the backend object for ``backend`` (``"auto"`` resolved from ``tensor``)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, not {type(backend).__name__}")
    name = auto_name(tensor) if backend == "auto" else backend
    if name not in REGISTRY:
        raise ValueError(
            f"unknown backend {backend!r}; choose one of: "
            + ", ".join(repr(n) for n in ("auto", *REGISTRY))
        )
    if name == "triton" and not triton_usable():
        raise RuntimeError(
            "backend 'triton' needs the triton package and a CUDA device, or "
            "TRITON_INTERPRET=1 to run its kernels on CPU tensors"
        )
    inst = _INSTANCES.get(name)
    if inst is None:
        inst = Composed(_make(name), None if name == PORTABLE else _make(PORTABLE))
        _INSTANCES[name] = inst
    return inst


def vocab_parallel(backend: str, tensor: Tensor, group: Any, start: int, total: int) -> Backend:
    """The backend of one rank of a vocabulary split: ``backend`` (resolved for ``tensor``)
    computes the partial statistics of this rank's classes ``[start, start + V_r)`` of
    ``total``, merged with the other ranks' over ``group``
    (:class:`~crossent.backends.vocab_parallel.VocabParallelBackend`)."""
    from .backends.vocab_parallel import VocabParallelBackend  # imports torch.distributed

    return VocabParallelBackend(group, start, total, resolve(backend, tensor))


def _make(name: str) -> Backend:
    module, cls = REGISTRY[name]
    backend: Backend = getattr(importlib.import_module(module), cls)()
    return backend
