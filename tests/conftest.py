"""Shared fixtures: every test that takes ``backend`` runs once per available backend."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator

import pytest
import torch

from crossent import dispatch

# The triton backend's kernels run on CPU tensors in Triton's interpreter, so wherever Triton
# is installed it joins every backend-parametrised test (set before any kernel is defined).
if importlib.util.find_spec("triton") is not None:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpret_helpers_without_repatching() -> None:
    """Triton's interpreter patches ``triton.language`` when a kernel starts and restores it
    when the kernel ends, and patches it again, at about a millisecond each time, on every call
    of a ``@triton.jit`` helper inside the kernel, where it is patched already (the same module
    object). Here a helper patches only when the language is not patched yet: the kernels run
    the same operations, several times faster (the suite calls them tens of thousands of
    times). Left alone where the interpreter's layout is not the one this was written for."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    cls = getattr(interpreter, "InterpretedFunction", None)
    patch = getattr(interpreter, "_patch_lang", None)
    if cls is None or patch is None or not hasattr(cls, "rewrite"):
        return

    def call(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        # triton.language and its core module are patched apart (the kernel patches the
        # modules its own globals name, a helper of the standard library those it names)
        if tl.core.is_builtin(tl.load) or tl.core.is_builtin(tl.core.load):
            patch(self.fn)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e

    cls.__call__ = call


if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
    _interpret_helpers_without_repatching()


@pytest.fixture(params=dispatch.available())
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Run a module's tiny-tensor tests on one torch thread.

    Tiny tensors gain nothing from torch's intra-op pool; its wake-up latency reached ~15 ms
    per op on a loaded 2-core machine (measured) and dominated the runtime. Results are
    compared with torch's in the same process, so nothing else changes.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
