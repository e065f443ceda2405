"""The triton backend's own checks; its parity with torch runs in the backend-parametrised
suites (in Triton's interpreter where no GPU is present)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import crossent
from crossent import dispatch

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton not installed")  # fmt: skip


@needs_triton
def test_the_gpu_check_script_runs_interpreted() -> None:
    # tests/triton_check.py is what test_cuda.py runs compiled on a GPU; here its CPU mode, in
    # the interpreter, so the script itself is known to work before a GPU runs it
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    script = Path(__file__).with_name("triton_check.py")
    done = subprocess.run([sys.executable, "-W", "ignore", str(script), "cpu"], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-20000:] + done.stderr[-5000:]
    lines = done.stdout.splitlines()
    assert lines[-1] == "0 failed" and sum(line.startswith("PASS") for line in lines) == 48


@needs_triton
def test_auto_does_not_pick_triton() -> None:
    x = torch.zeros(2, 3)
    assert dispatch.resolve("auto", x).name != "triton"
    assert "triton" in dispatch.available()  # the tests run its kernels interpreted


@needs_triton
def test_cpu_tensors_need_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("with a CUDA device the backend is available; the kernel's device check "
                    "is what refuses CPU tensors")
    assert "triton" not in dispatch.available()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        crossent.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]), backend="triton")
