"""Backend resolution: ``resolve(backend, tensor) -> Backend``.

``backend="auto"`` picks per call from the tensor's device (:mod:`crossent.functional` hands
small CPU problems to torch's own functions before getting here). Nothing is chosen, imported
or queried at import time, and a backend that cannot run raises instead of falling back.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Literal

from torch import Tensor

from .backends.base import Backend

BackendName = Literal["auto", "cpu", "torch", "triton", "reference"]

# name -> (module, class). Modules are imported on first use only.
_REGISTRY: dict[str, tuple[str, str]] = {
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
    return tuple(n for n in _REGISTRY if n != "triton" or triton_usable())


def auto_name(tensor: Tensor) -> str:
    """The backend ``"auto"`` selects for ``tensor``: fused kernels on CPU, else portable torch."""
    return "cpu" if tensor.device.type == "cpu" else "torch"


def resolve(backend: str, tensor: Tensor) -> Backend:
    """Return the backend object for ``backend`` (``"auto"`` resolved from ``tensor``)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, not {type(backend).__name__}")
    name = auto_name(tensor) if backend == "auto" else backend
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown backend {backend!r}; choose one of: "
            + ", ".join(repr(n) for n in ("auto", *_REGISTRY))
        )
    if name == "triton" and not triton_usable():
        raise RuntimeError(
            "backend 'triton' needs the triton package and a CUDA device, or "
            "TRITON_INTERPRET=1 to run its kernels on CPU tensors"
        )
    inst = _INSTANCES.get(name)
    if inst is None:
        module, cls = _REGISTRY[name]
        inst = getattr(importlib.import_module(module), cls)()
        _INSTANCES[name] = inst
    return inst
