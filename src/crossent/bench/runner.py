"""``crossent bench``: parse options, plan the (case, provider) tasks, run each in a fresh child
process, hand the results to :mod:`.report`.

Children come from a ``forkserver`` that has imported torch and crossent and done nothing else,
so every task starts from the same clean process (its own heap, allocator state, compile
caches in memory and thread pools) in ~50 ms instead of the ~2 s a fresh interpreter takes to
import torch. One task runs at a time: timings on a shared 2-core machine are noisy enough.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from . import report
from .cases import FAMILY_MODULES, Case, families, parse_dtypes, select_cases
from .providers import TORCH_COMPILE, Provider, candidates

DEFAULT_WARMUP = 1
DEFAULT_REPEATS = 3
DEFAULT_TIMEOUT_S = 1200.0


@dataclass(frozen=True)
class Task:
    case: Case
    provider: Provider


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="crossent bench",
        description=(
            "Time forward, backward and forward+backward of crossent and its peers, each "
            "(case, provider) in a fresh process; print a Markdown table, write CSV, Markdown "
            "and PNG (see benchmarks/README.md)."
        ),
    )
    p.add_argument(
        "--cases",
        metavar="LIST",
        help="comma-separated: family (ce, softmax, log_softmax), shape (4096x32000), or "
        "FAMILY:SHAPE (also adds a shape that is not a default one). Default: all",
    )
    p.add_argument(
        "--providers",
        metavar="LIST",
        help="comma-separated provider names or prefixes (crossent, crossent-auto, torch, "
        "torch-eager, torch-compile). torch-eager always runs: the ratios refer to it",
    )
    p.add_argument(
        "--dtypes", metavar="LIST", help="comma-separated: float32,bfloat16 (default both)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small shapes, no torch.compile unless named in "
        "--providers: a smoke test that runs in seconds",
    )
    p.add_argument(
        "--warmup",
        metavar="K",
        type=_pos,
        default=DEFAULT_WARMUP,
        help=f"untimed calls before the measured ones, the first of them timed apart as the "
        f"first call (default {DEFAULT_WARMUP})",
    )
    p.add_argument(
        "--repeats",
        metavar="K",
        type=_pos,
        default=DEFAULT_REPEATS,
        help=f"timed calls (default {DEFAULT_REPEATS})",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help=f"seconds per task before it is killed and recorded as an error (default "
        f"{DEFAULT_TIMEOUT_S:.0f})",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="output folder (default benchmarks/results/<machine>/ under the current folder)",
    )
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    p.add_argument(
        "--check",
        choices=("sample", "full", "off"),
        default="sample",
        help="compare each provider's output and gradient with the float64 oracle on a sample "
        "of rows spread over the batch (default; losses always on every row), on every row, "
        "or not at all",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cpu (default): this harness, CPU tensors, a child process per task; cuda: the "
        "GPU harness (crossent.bench.gpu: the Triton kernels against torch eager, "
        "torch.compile and the peers installed, against the copy bandwidth and bfloat16 "
        "matmul rate measured in the same run; --quick, --repeats and --out apply)",
    )
    p.add_argument("--list", action="store_true", help="print the planned tasks and exit")
    return p


def _pos(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def plan(
    cases: list[Case], provider_filter: str | None, quick: bool
) -> tuple[list[Task], list[str]]:
    """Tasks in run order (each distinct floor first, then the cases), and notes."""
    fams = families()
    tokens = [t.strip() for t in (provider_filter or "").split(",") if t.strip()]
    notes: list[str] = []
    tasks: list[Task] = []
    floors: list[Task] = []
    for case in cases:
        fam = fams[case.family]
        found, skipped = candidates(case.torch_dtype)
        skipped.update(fam.not_applicable())  # "does not apply" beats "not installed"
        notes += [n for n in skipped.values() if n not in notes]
        provs = fam.providers(case, found)
        if tokens:
            unknown = [t for t in tokens if not any(p.matches(t) for p in provs)]
            for t in unknown:
                note = f"--providers: {t!r} matches no provider of {case.family}"
                if note not in notes:
                    notes.append(note)
            provs = [
                p for p in provs if p.name == fam.baseline or any(p.matches(t) for t in tokens)
            ]
        elif quick:
            provs = [p for p in provs if p != TORCH_COMPILE]
        tasks += [Task(case, p) for p in provs]
        floor = fam.floor(case)
        if floor is not None:
            for p in fams[floor.family].providers(floor, []):
                if Task(floor, p) not in floors:
                    floors.append(Task(floor, p))
    if quick and not tokens:
        notes.append("--quick: torch.compile left out (name it in --providers to include it)")
    return floors + tasks, notes


def task_spec(task: Task, warmup: int, repeats: int, check: str) -> dict[str, Any]:
    return {
        "case": task.case.to_json(),
        "provider": task.provider.to_json(),
        "warmup": warmup,
        "repeats": repeats,
        "check": check,
        "seed": 0,
    }


def _context() -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "crossent", "crossent.bench.worker", *FAMILY_MODULES])
    return ctx


def run_in_child(ctx: Any, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run :func:`.worker.run_task` in a fresh child; errors come back as ``{"error": ...}``."""
    from .worker import run_task

    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=run_task, args=(spec, send), daemon=True)
    proc.start()
    send.close()  # the child holds the only write end: its death reads as EOF
    try:
        if not recv.poll(timeout):
            proc.kill()
            proc.join()
            return {"error": f"timed out after {timeout:.0f} s"}
        result: dict[str, Any] = recv.recv()
    except EOFError:
        proc.join()
        code = proc.exitcode
        why = " (killed: out of memory?)" if code == -9 else ""
        return {"error": f"worker died with exit code {code}{why}"}
    except BaseException:  # KeyboardInterrupt: take the child down with us
        proc.kill()
        proc.join()
        raise
    finally:
        recv.close()
    proc.join()
    return result


def _progress(i: int, n: int, task: Task, err: TextIO) -> None:
    print(
        f"[{i}/{n}] {task.case.label} {task.case.dtype} {task.provider.name} ...",
        file=err,
        flush=True,
    )


def _gpu(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``--device cuda``: :func:`.gpu.run` (its own cases; --cases/--providers do not apply)."""
    import torch

    if not torch.cuda.is_available():
        print("crossent bench: --device cuda needs a CUDA device", file=err)
        return 2
    from .gpu import run

    repeats = args.repeats if args.repeats != DEFAULT_REPEATS else 10
    return run(torch.device("cuda"), args.quick, repeats, args.out, out, err)


def _done(res: dict[str, Any], seconds: float, err: TextIO) -> None:
    if "error" in res:
        text = f"error: {res['error']}"
    else:
        fb = [f + b for f, b in zip(res["fwd_ms"], res["bwd_ms"], strict=True)]
        text = f"{report.median(fb):.2f} ms fwd+bwd, peak {res['peak_bytes'] / 2**20:.0f} MiB"
        if res.get("out_ok") is False or res.get("grad_ok") is False:
            text += f", MISMATCH: {res.get('check_note', '')}"
    print(f"      {text} ({seconds:.1f} s)", file=err, flush=True)


def main(
    argv: list[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run ``crossent bench`` with ``argv`` (without the program name).

    Returns 0 when every row that ran matches the oracle, 1 on a mismatch, 2 on bad usage.
    Provider errors are rows with a note, not failures.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
        if args.device == "cuda":
            return _gpu(args, out, err)
        cases = select_cases(args.cases, parse_dtypes(args.dtypes), args.quick)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    except ValueError as exc:
        print(f"crossent bench: {exc}", file=err)
        return 2
    if not cases:
        print("crossent bench: no case matches --cases/--dtypes", file=err)
        return 2
    warmup = args.warmup
    repeats = args.repeats
    tasks, notes = plan(cases, args.providers, args.quick)
    if args.list:
        for t in tasks:
            print(f"{t.case.label} {t.case.dtype} {t.provider.name}", file=out)
        for n in notes:
            print(f"note: {n}", file=out)
        return 0

    ctx = _context()
    results: dict[Task, dict[str, Any]] = {}
    start = time.perf_counter()
    for i, task in enumerate(tasks, 1):
        _progress(i, len(tasks), task, err)
        t0 = time.perf_counter()
        spec = task_spec(task, warmup, repeats, args.check)
        results[task] = run_in_child(ctx, spec, args.timeout)
        _done(results[task], time.perf_counter() - t0, err)
    elapsed = time.perf_counter() - start

    info = report.run_info(argv, warmup, repeats, results.values(), elapsed)
    rows = report.build_rows(cases, tasks, results)
    out_dir = args.out or Path("benchmarks") / "results" / info.machine
    stem = "bench-quick" if args.quick else "bench"
    paths = report.write_all(rows, info, notes, out_dir, stem, plot=not args.no_plot, err=err)
    print(report.markdown(rows, info, notes), file=out)
    for p in paths:
        print(f"wrote {p}", file=err)
    mismatched = [r for r in rows if r.out_ok == "no" or r.grad_ok == "no"]
    return 1 if mismatched else 0
