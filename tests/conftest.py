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
