"""Tests for ``crossent.demo`` and ``crossent.cli``: the numbers the demo prints are asserted.

Tolerances, and why:

* crossent vs torch: crossent computes cross entropy in one fused pass, torch as log_softmax
  followed by nll_loss, so the two may round differently. One loss evaluation on identical
  weights (epoch 1) must agree to within ``RTOL_ONE_EVAL = 1e-6`` (about 8 float32 ulps,
  eps = 1.19e-7). Over the 200 SGD epochs those last-bit differences feed back into the weights;
  full-batch SGD on this problem is contracting, so they stay tiny, but we allow
  ``RTOL_TRAINING = 1e-5`` (about 80 ulps) at every epoch.
* torch CrossEntropyLoss vs torch NLLLoss(LogSoftmax): torch's cross_entropy *is*
  log_softmax + nll_loss, so the two runs perform the same float32 operations and should agree
  bit for bit; we allow ``RTOL_SAME_OPS = 2.5e-7`` (about 2 ulps) so that a future torch
  reassociating a reduction does not break the test.
* Comparisons of a float32 result with a float64 numpy reference use ``RTOL_ONE_EVAL``.
"""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import TextIO

import numpy as np
import pytest
import torch

import crossent
from crossent import cli
from crossent.demo import (
    DEFAULT_EPOCHS,
    LARGE_LOGITS,
    LARGE_TARGET,
    PROBABILITY_SAMPLES,
    WORKED_TARGET,
    WORKED_X,
    DemoResult,
    load_iris,
    run_demo,
)

RTOL_ONE_EVAL = 1e-6
RTOL_TRAINING = 1e-5
RTOL_SAME_OPS = 2.5e-7


@pytest.fixture(scope="module")
def demo() -> tuple[DemoResult, str]:
    """Run the demo once (default settings) and keep both the result and the printed text."""
    buf = io.StringIO()
    result = run_demo(file=buf)
    return result, buf.getvalue()


def _lse_mean_ce(logits: object, target: object) -> float:
    """Mean cross entropy in float64 by hand: log(sum(exp(x - max))) + max - x[target]."""
    x = np.asarray(logits, dtype=np.float32).astype(np.float64)
    t = np.asarray(target)
    m = x.max(axis=1)
    lse = m + np.log(np.exp(x - m[:, None]).sum(axis=1))
    return float(np.mean(lse - x[np.arange(len(t)), t]))


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def test_iris_is_the_real_data_set() -> None:
    features, labels = load_iris()
    assert features.shape == (150, 4)
    assert features.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert torch.bincount(labels).tolist() == [50, 50, 50]
    means = features.to(torch.float64).mean(dim=0).tolist()
    assert means == pytest.approx([5.8433, 3.0573, 3.7580, 1.1993], abs=1e-4)
    assert features[0].tolist() == pytest.approx([5.1, 3.5, 1.4, 0.2])
    assert features[-1].tolist() == pytest.approx([5.9, 3.0, 5.1, 1.8])


# ----------------------------------------------------------------------------------------------
# (a) Training three ways
# ----------------------------------------------------------------------------------------------


def test_training_runs_have_one_loss_per_epoch(demo: tuple[DemoResult, str]) -> None:
    result, _ = demo
    assert result.epochs == DEFAULT_EPOCHS
    for losses in (result.losses_crossent, result.losses_torch_ce, result.losses_torch_nll):
        assert len(losses) == result.epochs
        assert all(math.isfinite(v) for v in losses)
    # Training makes progress: the loss falls a lot from the start.
    assert result.losses_torch_ce[-1] < 0.2 * result.losses_torch_ce[0]


def test_initial_weights_are_identical(demo: tuple[DemoResult, str]) -> None:
    result, _ = demo
    # Epoch 1 is evaluated on the shared initial weights: the two torch formulations are the
    # same float32 computation, and crossent's fused one is within a few ulps.
    assert result.losses_torch_ce[0] == pytest.approx(result.losses_torch_nll[0], rel=1e-7)
    assert result.losses_crossent[0] == pytest.approx(result.losses_torch_ce[0], rel=RTOL_ONE_EVAL)


def test_crossent_run_matches_torch_run_every_epoch(demo: tuple[DemoResult, str]) -> None:
    result, _ = demo
    np.testing.assert_allclose(
        result.losses_crossent, result.losses_torch_ce, rtol=RTOL_TRAINING, atol=0
    )
    np.testing.assert_allclose(
        result.losses_crossent, result.losses_torch_nll, rtol=RTOL_TRAINING, atol=0
    )


def test_torch_runs_agree_every_epoch(demo: tuple[DemoResult, str]) -> None:
    result, _ = demo
    np.testing.assert_allclose(
        result.losses_torch_ce, result.losses_torch_nll, rtol=RTOL_SAME_OPS, atol=0
    )


def test_max_abs_diff_properties(demo: tuple[DemoResult, str]) -> None:
    result, _ = demo
    diffs = [
        abs(a - b) for a, b in zip(result.losses_crossent, result.losses_torch_ce, strict=True)
    ]
    assert result.max_abs_diff_crossent_vs_torch == max(diffs)
    assert result.max_abs_diff_crossent_vs_torch <= RTOL_TRAINING * max(result.losses_torch_ce)
    assert result.max_abs_diff_torch_ce_vs_nll <= RTOL_SAME_OPS * max(result.losses_torch_ce)


def test_final_accuracy(demo: tuple[DemoResult, str]) -> None:
    result, _ = demo
    for acc in (result.accuracy_crossent, result.accuracy_torch_ce, result.accuracy_torch_nll):
        assert 0.9 <= acc <= 1.0
    # Accuracies are k/150; the runs agree on the predictions.
    assert result.accuracy_crossent == result.accuracy_torch_ce == result.accuracy_torch_nll


def test_demo_is_fast(demo: tuple[DemoResult, str]) -> None:
    result, _ = demo
    assert result.seconds < 10.0


def test_demo_is_deterministic() -> None:
    a = run_demo(epochs=15, file=io.StringIO())
    b = run_demo(epochs=15, file=io.StringIO())
    assert a.losses_crossent == b.losses_crossent
    assert a.losses_torch_ce == b.losses_torch_ce
    assert a.losses_torch_nll == b.losses_torch_nll


def test_demo_does_not_touch_global_rng() -> None:
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    run_demo(epochs=2, file=io.StringIO())
    assert torch.equal(torch.rand(3), expected)


def test_demo_restores_thread_count() -> None:
    before = torch.get_num_threads()
    run_demo(epochs=2, file=io.StringIO())
    assert torch.get_num_threads() == before


def test_run_demo_rejects_zero_epochs() -> None:
    with pytest.raises(ValueError, match="epochs"):
        run_demo(epochs=0, file=io.StringIO())


# ----------------------------------------------------------------------------------------------
# (b) The 5x3 worked example
# ----------------------------------------------------------------------------------------------


def test_worked_example_inputs_are_the_seed_literals() -> None:
    assert WORKED_X[0] == (0.9826, 1.0630, -0.4096)
    assert WORKED_X[-1] == (1.8186, -0.2998, 0.1128)
    assert WORKED_TARGET == (1, 0, 1, 1, 1)


def test_worked_example_every_formulation_gives_1_4904(demo: tuple[DemoResult, str]) -> None:
    result, _ = demo
    names = [f.name for f in result.worked_example]
    assert len(names) == len(set(names)) >= 7
    reference = _lse_mean_ce(WORKED_X, WORKED_TARGET)
    assert result.worked_reference == pytest.approx(reference, rel=1e-12)
    assert round(reference, 4) == 1.4904
    n_crossent = 0
    for f in result.worked_example:
        assert round(f.torch, 4) == 1.4904, f
        assert f.torch == pytest.approx(reference, rel=RTOL_ONE_EVAL), f
        if f.crossent is not None:
            n_crossent += 1
            assert round(f.crossent, 4) == 1.4904, f
            assert f.crossent == pytest.approx(reference, rel=RTOL_ONE_EVAL), f
    assert n_crossent >= 5


def test_worked_example_direct_calls() -> None:
    x = torch.tensor(WORKED_X, dtype=torch.float32)
    t = torch.tensor(WORKED_TARGET)
    values = [
        crossent.cross_entropy(x, t),
        crossent.nll_loss(crossent.log_softmax(x, dim=-1), t),
        crossent.nll_loss(torch.log(crossent.softmax(x, dim=-1)), t),
        crossent.CrossEntropyLoss()(x, t),
        crossent.NLLLoss()(crossent.LogSoftmax(dim=1)(x), t),
    ]
    for v in values:
        assert v.dtype == torch.float32
        assert round(v.item(), 4) == 1.4904


# ----------------------------------------------------------------------------------------------
# (c) Large logits
# ----------------------------------------------------------------------------------------------


def test_large_logits_reference_by_hand() -> None:
    # log(1 + e^-1 + e^-2) and log(1 + e^-3 + e^-5), averaged.
    row0 = math.log(1 + math.exp(-1) + math.exp(-2))
    row1 = math.log(1 + math.exp(-3) + math.exp(-5))
    assert _lse_mean_ce(LARGE_LOGITS, LARGE_TARGET) == pytest.approx((row0 + row1) / 2, rel=1e-14)


def test_large_logits_crossent_is_finite_and_exact(demo: tuple[DemoResult, str]) -> None:
    result, _ = demo
    reference = _lse_mean_ce(LARGE_LOGITS, LARGE_TARGET)
    assert result.large_logit_reference == pytest.approx(reference, rel=1e-12)
    for f in result.large_logit:
        assert f.crossent is not None
        assert math.isfinite(f.crossent), f
        assert f.crossent == pytest.approx(reference, rel=RTOL_ONE_EVAL), f
        assert math.isfinite(f.torch), f
        assert f.torch == pytest.approx(reference, rel=RTOL_ONE_EVAL), f
    # Directly, outside the demo as well.
    x = torch.tensor(LARGE_LOGITS, dtype=torch.float32)
    t = torch.tensor(LARGE_TARGET)
    loss = crossent.cross_entropy(x, t).item()
    assert math.isfinite(loss)
    assert loss == pytest.approx(reference, rel=RTOL_ONE_EVAL)


def test_large_logits_naive_formulation_is_not_finite(demo: tuple[DemoResult, str]) -> None:
    result, _ = demo
    assert not math.isfinite(result.large_logit_naive)
    x = torch.tensor(LARGE_LOGITS, dtype=torch.float32)
    probs = x.exp() / x.exp().sum(-1, keepdim=True)
    assert not torch.isfinite(probs).all()


# ----------------------------------------------------------------------------------------------
# (d) Probabilities
# ----------------------------------------------------------------------------------------------


def test_probabilities_agree_and_predict_true_class(demo: tuple[DemoResult, str]) -> None:
    result, _ = demo
    _, labels = load_iris()
    assert len(result.probabilities) >= 3
    tables = [np.asarray(v, dtype=np.float64) for v in result.probabilities.values()]
    first = tables[0]
    assert first.shape == (len(PROBABILITY_SAMPLES), 3)
    for table in tables:
        np.testing.assert_allclose(table.sum(axis=1), 1.0, atol=1e-6)
        np.testing.assert_allclose(table, first, rtol=0, atol=1e-5)
        assert table.argmax(axis=1).tolist() == [int(labels[i]) for i in PROBABILITY_SAMPLES]


# ----------------------------------------------------------------------------------------------
# Printed output and the command line
# ----------------------------------------------------------------------------------------------


def _table_rows(text: str) -> list[list[str]]:
    """The rows of the per-epoch loss table: between the header line and the closing rule."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["epoch"])
    assert set(lines[start + 1]) == {"-"}
    rows: list[list[str]] = []
    for line in lines[start + 2 :]:
        if set(line) == {"-"}:
            return rows
        parts = line.split()
        assert len(parts) == 6 and parts[0].isdigit(), line
        rows.append(parts)
    raise AssertionError("loss table is not closed")


def test_printed_table(demo: tuple[DemoResult, str]) -> None:
    result, text = demo
    assert "crossent CE" in text and "torch CE" in text and "torch NLL" in text
    rows = _table_rows(text)
    assert 15 <= len(rows) <= 25
    assert rows[0][0] == "1" and rows[-1][0] == str(result.epochs)
    for row in rows:
        i = int(row[0]) - 1
        assert float(row[1]) == pytest.approx(result.losses_crossent[i], abs=1e-7)
        assert float(row[2]) == pytest.approx(result.losses_torch_ce[i], abs=1e-7)
        assert float(row[3]) == pytest.approx(result.losses_torch_nll[i], abs=1e-7)
    assert "max |loss difference|" in text
    assert "1.4903936" in text
    assert text.isascii()


def test_cli_demo(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "epoch" in out
    assert len(_table_rows(out)) >= 15
    assert "final training accuracy" in out
    assert "(b) Worked example" in out and "(c) Large logits" in out and "(d) Predicted" in out


def test_cli_demo_epochs(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--epochs", "5"]) == 0
    rows = _table_rows(capsys.readouterr().out)
    assert [r[0] for r in rows] == ["1", "2", "3", "4", "5"]


@pytest.mark.parametrize("argv", [[], ["demo", "--epochs", "0"], ["demo", "extra"], ["nope"]])
def test_cli_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    assert "usage:" in capsys.readouterr().err


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("crossent ")
    assert len(out.split()) == 2


def test_cli_check_uses_run_check(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = types.ModuleType("crossent.check")

    def run_check(file: TextIO = sys.stdout) -> int:
        print("fake check ran", file=file)
        return 3

    fake.run_check = run_check  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "crossent.check", fake)
    assert cli.main(["check"]) == 3
    assert "fake check ran" in capsys.readouterr().out


def test_cli_bench_passes_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType("crossent.bench")

    def main(argv: list[str]) -> int:
        seen.append(list(argv))
        return 0

    fake.main = main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "crossent.bench", fake)
    assert cli.main(["bench", "--size", "64", "-v", "--help"]) == 0
    assert seen == [["--size", "64", "-v", "--help"]]


def test_cli_bench_unavailable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "crossent.bench", None)  # makes the import fail
    assert cli.main(["bench"]) == 2
    assert "crossent bench is not available in this version" in capsys.readouterr().err


def test_python_dash_m_crossent_demo() -> None:
    src = str(Path(crossent.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "crossent", "demo", "--epochs", "20"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(_table_rows(proc.stdout)) == 20
