"""The examples run, on tiny shapes, and check what they claim (each exits non-zero if not)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize(
    ("script", "expect"),
    [("hf_finetune.py", "largest loss difference"), ("grpo_logprobs.py", "log-prob max |diff|")],
)
def test_example_runs(script: str, expect: str) -> None:
    pytest.importorskip("transformers")
    res = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--tiny"], capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert expect in res.stdout


def test_vocab_parallel_example_runs_on_two_ranks() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(EXAMPLES / "vocab_parallel.py"), "--tiny"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert "largest loss difference over 3 steps" in res.stdout
