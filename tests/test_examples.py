"""The examples run, on tiny shapes, and check what they claim (each exits non-zero if not)."""

from __future__ import annotations

import os
import socket
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
    # the two ranks started as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT set;
    # the README runs it with torchrun itself)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, str(EXAMPLES / "vocab_parallel.py"), "--tiny"],
            env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        for r in range(2)
    ]  # fmt: skip
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "largest loss difference over 3 steps" in outs[0][0]
