"""``crossent bench``: the harness runs, writes one row per (case, provider, dtype) attempted, and
every derived number in a row is what its own columns say it is."""

from __future__ import annotations

import importlib.util
import io
import math
import re
from pathlib import Path

import pytest
import torch

import crossent.bench
from crossent import dispatch
from crossent.bench import report, worker
from crossent.bench.cases import parse_dtypes, select_cases

# --quick's cases on logits: ce at a small V and at a real vocabulary, softmax and log_softmax,
# both dtypes (and one linear_ce case).
QUICK_CASES = {"ce 256x1000", "ce 32x32000", "softmax 256x1000", "log_softmax 256x1000"}
DTYPES = {"float32", "bfloat16"}
ELEM = {"float32": 4, "bfloat16": 2}
FLOOR = "floor (exp float32)"


def crossent_providers(dtype: torch.dtype) -> set[str]:
    """What the harness must benchmark: backend="auto", with and without buffer reuse, plus
    each other backend by name (not the float64 oracle, nor triton, which runs CPU tensors
    only in Triton's interpreter)."""
    picked = dispatch.auto_name(torch.empty(0, dtype=dtype))
    skip = ("reference", "triton", picked)
    names = {f"crossent-{n}" for n in dispatch.available() if n not in skip}
    return {"crossent-auto", "crossent-auto-reuse", *names}


def run(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = crossent.bench.main(args, out=out, err=err)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, str, Path]:
    d = tmp_path_factory.mktemp("bench")
    rc, out, err = run(["--quick", "--out", str(d), "--no-plot"])
    return rc, out, err, d


@pytest.fixture(scope="module")
def all_rows(quick: tuple[int, str, str, Path]) -> list[dict[str, str]]:
    return report.read_csv(quick[3] / "bench-quick.csv")


@pytest.fixture(scope="module")
def rows(all_rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The families on materialised logits (linear_ce and llama_step have tests of their
    own below)."""
    return [r for r in all_rows if r["family"] in ("ce", "softmax", "log_softmax")]


def test_llama_step_rows(all_rows: list[dict[str, str]]) -> None:
    # a transformers Llama step: stock, patched by crossent.integrations.transformers, and
    # stock logits with crossent.cross_entropy; each checked against the float64 evaluation
    llama = [r for r in all_rows if r["family"] == "llama_step"]
    if importlib.util.find_spec("transformers") is None:
        assert all("transformers is not installed" in r["note"] for r in llama), llama
        return
    assert {r["provider"] for r in llama} == {"torch-eager", "crossent", "crossent-logits"}
    base = num(next(r for r in llama if r["provider"] == "torch-eager"), "fwdbwd_ms")
    for r in llama:
        assert r["case"] == "llama_step 1000x64x32x2" and r["dtype"] == "float32", r
        assert r["out_ok"] == "yes" and r["grad_ok"] == "yes", r
        assert close(num(r, "x_torch"), base / num(r, "fwdbwd_ms")), r


def test_linear_cross_entropy_rows(all_rows: list[dict[str, str]]) -> None:
    lin = [r for r in all_rows if r["family"] == "linear_ce"]
    peers = {"cut-cross-entropy"} if importlib.util.find_spec("cut_cross_entropy") else set()
    for dt in DTYPES:
        floor = f"floor (matmul3 {dt})"
        got = {r["provider"] for r in lin if r["dtype"] == dt}
        assert got == crossent_providers(getattr(torch, dt)) | peers | {
            "torch-eager", "torch-linear-ce", "torch-linear-ce-chunked", floor
        }
        for r in lin:
            if r["dtype"] != dt:
                continue
            assert r["case"] == "linear_ce 256x64x1000"
            n, d, v = map(int, r["shape"].split("x"))
            assert int(r["min_bytes"]) == 2 * (n * d + v * d) * ELEM[dt]
            assert r["out_ok"] == "yes", r
            assert r["grad_ok"] == ("" if r["provider"] == floor else "yes"), r
            floor_ms = num(next(x for x in lin if x["provider"] == floor and x["dtype"] == dt),
                           "fwdbwd_ms")
            assert close(num(r, "pct_floor"), 100 * floor_ms / num(r, "fwdbwd_ms")), r


def num(row: dict[str, str], key: str) -> float:
    v = float(row[key])
    assert math.isfinite(v), (key, row)
    return v


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=2e-5)  # the CSV keeps 6 significant digits


def test_quick_run_succeeds_and_writes_files(quick: tuple[int, str, str, Path]) -> None:
    rc, out, err, d = quick
    assert rc == 0, err
    assert sorted(p.name for p in d.iterdir()) == ["bench-quick.csv", "bench-quick.md"]
    header = (d / "bench-quick.csv").read_text().splitlines()[:7]
    for key in ("# machine: cpu-", "# instruction set: ", "# versions: torch ", "# date: ",
                "# command: crossent bench"):  # fmt: skip
        assert any(line.startswith(key) for line in header), (key, header)
    assert "] ce 32x32000 bfloat16 torch-eager ..." in err  # progress lines on stderr


def test_one_row_per_case_provider_dtype(rows: list[dict[str, str]]) -> None:
    got = [(r["case"], r["dtype"], r["provider"]) for r in rows]
    assert len(got) == len(set(got))
    expected = {
        (case, dt, prov)
        for case in QUICK_CASES
        for dt in DTYPES
        for prov in crossent_providers(getattr(torch, dt)) | {"torch-eager", FLOOR}
    }
    assert set(got) == expected  # no torch-compile: --quick leaves it out


def test_times_are_positive_and_the_median_lies_in_its_range(rows: list[dict[str, str]]) -> None:
    for r in rows:
        if r["provider"] == FLOOR:  # the note gives the time of exp allocating its output
            what, _, ms = r["note"].partition(": ")
            assert what == "same, allocating its output" and float(ms.split()[0]) > 0, r
        else:  # nothing to report but a slow first call (compilation) or a buffer cache
            for note in filter(None, r["note"].split("; ")):
                assert re.fullmatch(r"first call \d+\.\d s|keeps [\d,]+ MiB between calls", note), r
        t = num(r, "fwdbwd_ms")
        assert 0 < num(r, "fwdbwd_min_ms") <= t <= num(r, "fwdbwd_max_ms"), r
        assert num(r, "first_call_ms") > 0 and int(r["repeats"]) == 3
        if r["provider"] != FLOOR:
            assert num(r, "fwd_ms") > 0 and num(r, "bwd_ms") > 0, r


def test_ratio_floor_fraction_and_bandwidth_follow_from_the_row(rows: list[dict[str, str]]) -> None:
    by = {(r["case"], r["dtype"], r["provider"]): r for r in rows}
    for r in rows:
        t = num(r, "fwdbwd_ms")
        torch_ms = num(by[(r["case"], r["dtype"], "torch-eager")], "fwdbwd_ms")
        floor_ms = num(by[(r["case"], r["dtype"], FLOOR)], "fwdbwd_ms")
        assert close(num(r, "baseline_ms"), torch_ms) and close(num(r, "floor_ms"), floor_ms)
        assert close(num(r, "x_torch"), torch_ms / t), r
        assert close(num(r, "pct_floor"), 100 * floor_ms / t), r
        assert close(num(r, "gb_s"), int(r["min_bytes"]) / (t * 1e-3) / 1e9), r
        n, v = map(int, r["shape"].split("x"))
        if r["provider"] == FLOOR:
            assert int(r["min_bytes"]) == 2 * n * v * 4  # read and write float32 once
        elif r["family"] == "ce":
            assert int(r["min_bytes"]) == 2 * n * v * ELEM[r["dtype"]]
        else:  # softmax: x in, y out, y and dL/dy in, dL/dx out
            assert int(r["min_bytes"]) == 5 * n * v * ELEM[r["dtype"]]
    for r in rows:
        if r["provider"] == "torch-eager":
            assert float(r["x_torch"]) == 1.0
        if r["provider"] == FLOOR:
            assert float(r["pct_floor"]) == 100.0


def test_every_provider_matches_the_oracle(rows: list[dict[str, str]]) -> None:
    for r in rows:
        assert r["out_ok"] == "yes", r
        assert r["grad_ok"] == ("" if r["provider"] == FLOOR else "yes"), r


def test_peak_memory_counts_the_gradient_not_the_inputs(rows: list[dict[str, str]]) -> None:
    # The gradient is alive at the peak, so no provider can show less than one N×V buffer;
    # torch eager also keeps the log-probabilities and their gradient (>= 2 buffers). The floor
    # writes into a buffer allocated with the inputs: nothing above them.
    for r in rows:
        assert r["mem_method"] == "hwm" or r["mem_method"] == "sampled"
        # a cache between calls only keeps buffers that are in use at the peak
        assert 0 <= num(r, "retained_mib") <= num(r, "peak_mib") + 1, r
        if r["case"] != "ce 32x32000":  # big enough for page-granular counting to be tight
            continue
        grad_mib = 32 * 32000 * ELEM[r["dtype"]] / 2**20
        if r["provider"] == FLOOR:
            assert num(r, "peak_mib") < 0.1 * grad_mib, r
            continue
        assert num(r, "peak_mib") >= 0.95 * grad_mib, r
        if r["provider"] == "torch-eager":
            assert num(r, "peak_mib") >= 1.9 * grad_mib, r


def test_markdown_table_on_stdout(
    quick: tuple[int, str, str, Path], all_rows: list[dict[str, str]]
) -> None:
    out = quick[1]
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| case | dtype | provider | fwd ms | bwd ms | fwd+bwd ms |")
    assert "× torch" in lines[0] and "% of floor" in lines[0] and "peak MiB" in lines[0]
    assert len(lines) == 1 + len(all_rows)
    assert out.strip() == (quick[3] / "bench-quick.md").read_text().strip()


def test_plot_is_written_when_matplotlib_is_installed(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rc, _, err = run(["--quick", "--cases", "softmax", "--dtypes", "fp32", "--out", str(tmp_path)])
    assert rc == 0, err
    png = tmp_path / "bench-quick.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert (
        len(report.read_csv(tmp_path / "bench-quick.csv"))
        == len(crossent_providers(torch.float32)) + 2
    )  # + torch-eager + floor


def test_a_failing_task_is_a_row_with_a_note_not_a_crash(tmp_path: Path) -> None:
    rc, out, err = run(
        ["--quick", "--cases", "ce:8x10", "--dtypes", "fp32", "--timeout", "0.001",
         "--out", str(tmp_path), "--no-plot"]
    )  # fmt: skip
    assert rc == 0, err
    got = report.read_csv(tmp_path / "bench-quick.csv")
    assert {r["case"] for r in got} == {"ce 8x10"}
    assert all("timed out" in r["note"] and r["fwdbwd_ms"] == "" for r in got)
    assert "| — |" in out


def test_worker_records_errors_in_the_result() -> None:
    spec = {"case": {"family": "ce", "shape": [4, 10], "dtype": "float32"}, "warmup": 1,
            "repeats": 1, "check": "full"}  # fmt: skip
    bad_backend = worker.measure({**spec, "provider": {"name": "x", "kind": "crossent",
                                                        "backend": "nope"}})  # fmt: skip
    assert "unknown backend 'nope'" in bad_backend["error"]
    cce = worker.measure({**spec, "provider": {"name": "c", "kind": "cut-cross-entropy"}})
    assert cce["error"].startswith("not applicable")
    ok = worker.measure({**spec, "provider": {"name": "t", "kind": "torch"}})
    assert "error" not in ok and ok["out_ok"] and ok["grad_ok"] and len(ok["fwd_ms"]) == 1


def test_case_selection() -> None:
    fams = {c.family for c in select_cases("softmax", None, quick=False)}
    assert fams == {"softmax"}  # "softmax" does not match log_softmax
    by_shape = select_cases("4096x32000", parse_dtypes("bf16"), quick=False)
    assert {(c.label, c.dtype) for c in by_shape} == {
        (f"{f} 4096x32000", "bfloat16") for f in ("ce", "softmax", "log_softmax")
    }
    added = select_cases("ce:512x50257", parse_dtypes("fp32"), quick=True)
    assert [(c.label, c.dtype) for c in added] == [("ce 512x50257", "float32")]
    with pytest.raises(ValueError, match="neither a family"):
        select_cases("bogus", None, quick=False)
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtypes("int8")


def test_bad_usage_exits_2() -> None:
    assert run(["--cases", "bogus"])[0] == 2
    assert run(["--repeats", "0"])[0] == 2


def test_machine_slug_names_the_hardware_not_the_host() -> None:
    slug = report.machine_slug("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", 2)
    assert slug == "cpu-intel-xeon-platinum-8481c-2c"
    assert report.machine_slug("AMD EPYC 9R14 96-Core Processor", 2) == (
        "cpu-amd-epyc-9r14-96-core-2c"
    )
    # the vector width joins the name: results of AVX2 and AVX-512 machines sit apart
    assert report.machine_slug("AMD EPYC", 2, "avx512") == "cpu-amd-epyc-avx512-2c"
    assert report.isa_tag({"avx2", "avx512f", "fma"}) == "avx512"
    assert report.isa_tag({"avx2", "fma"}) == "avx2" and report.isa_tag(set()) == ""
    described = report.isa_description({"avx2", "avx512f", "avx512_bf16"})
    assert described.startswith("avx512f avx512_bf16 avx2;") and "torch's CPU kernels" in described


def test_the_gpu_harness_runs_its_quick_cases_here(tmp_path: Path) -> None:
    # crossent.bench.gpu is what `crossent bench --device cuda` runs; its quick cases on CPU
    # tensors (crossent's "auto" backend standing in for "triton"), so the harness itself is
    # known to work before a GPU runs it
    from crossent.bench import gpu

    out, err = io.StringIO(), io.StringIO()
    assert gpu.run(torch.device("cpu"), True, 2, tmp_path, out, err) == 0
    table = out.getvalue()
    assert "copy" in table.splitlines()[0] and "matmul" in table.splitlines()[0]
    rows = [line for line in table.splitlines()
            if line.startswith("| ") and ("GB/s |" in line or "TFLOP/s |" in line)]  # fmt: skip
    providers = {line.split(" | ")[2] for line in rows}
    assert {"crossent", "torch-eager", "torch-compile"} <= providers
    assert all(" ok " in line for line in rows if "| ce " in line or "| linear_ce " in line)
    assert (tmp_path / "gpu-quick.md").exists() and (tmp_path / "gpu-quick.csv").exists()


def test_the_gpu_harness_needs_a_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    err = io.StringIO()
    assert crossent.bench.main(["--device", "cuda"], io.StringIO(), err) == 2
    assert "needs a CUDA device" in err.getvalue()
