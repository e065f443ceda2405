"""Where a call runs when torch transforms it.

crossent's fused kernels are opaque to torch's program transforms. Three situations are
recognised and each gets what torch's own functions give:

- **torch.compile** (:func:`compiling`): Dynamo must not trace into the kernels (Numba,
  Triton launchers); calls go through the ``torch.ops.crossent`` custom operators
  (:mod:`crossent._ops`), whose fake implementations give shapes and dtypes and whose
  autograd formulas are the eager ones. No graph break; the same kernels run, so compiled
  results equal eager ones bit for bit.
- **torch.func transforms and forward-mode AD** (:func:`composed`): ``vmap``, ``grad``,
  ``jvp``, ``jacrev``/``jacfwd``, ``functional_call`` under them, and dual tensors of
  ``torch.autograd.forward_ad``. The call is computed with torch's own operations
  (:mod:`crossent._composite`), which every transform understands.
- **create_graph** (a second derivative: a gradient penalty, a Hessian-vector product,
  ``gradgradcheck``): backward then builds its gradient with differentiable torch
  operations from the saved inputs, so the graph of the gradient leads back to them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

_interpreters = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)


def functorch_active() -> bool:
    """Whether a torch.func transform (vmap, grad, jvp, ...) is running."""
    return _interpreters is not None and _interpreters() is not None


def _dual(t: Any) -> bool:
    from torch.autograd import forward_ad

    return isinstance(t, Tensor) and forward_ad.unpack_dual(t).tangent is not None


def composed(*tensors: Any) -> bool:
    """Whether a call on ``tensors`` must be computed with torch's own operations: inside a
    torch.func transform, or with an input carrying a forward-mode tangent. Never while
    Dynamo traces (which answers these queries for its own tracing, not for the call)."""
    if compiling():
        return False
    if functorch_active():
        return True
    from torch.autograd import forward_ad

    if getattr(forward_ad, "_current_level", -1) < 0:
        return False
    return any(_dual(t) for t in tensors)


def compiling() -> bool:
    """Whether Dynamo is tracing the call (torch.compile, torch.export)."""
    return torch.compiler.is_compiling()


def _legacy_batched(t: Tensor) -> bool:
    # torch.autograd.grad(..., is_grads_batched=True) runs backward under the older vmap,
    # whose batched tensors carry the Batched dispatch key and no functorch interpreter
    keys = repr(torch._C._dispatch_keys(t))
    return "Batched" in keys[keys.find("(") + 1 : -1].replace(" ", "").split(",")


def batched(*grads: Tensor) -> bool:
    """Inside a backward: whether an incoming gradient is batched by a transform (torch.func,
    or ``is_grads_batched``), so that only batchable torch operations may touch it."""
    return functorch_active() or any(_legacy_batched(g) for g in grads)


def differentiable_backward(*grads: Tensor) -> bool:
    """Inside a backward: whether the gradient must itself be differentiable (create_graph)
    or computed by batchable torch operations (:func:`batched`)."""
    return torch.is_grad_enabled() or batched(*grads)
