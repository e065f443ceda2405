"""From raw child results to rows: medians, ratio to torch eager, fraction of the floor, GB/s,
peak MiB; then the Markdown table, the CSV (with a header comment block) and the PNG plot."""

from __future__ import annotations

import csv
import datetime
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from .cases import Case, families

if TYPE_CHECKING:
    from .runner import Task


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


@dataclass
class Row:
    """One line of the table and the CSV. Times are medians in ms; ``None`` when not measured."""

    case: str  # "ce 4096x32000"
    family: str
    shape: str  # "4096x32000"
    dtype: str
    provider: str
    backend: str  # crossent backend actually used ("auto" resolved), else ""
    fwd_ms: float | None
    bwd_ms: float | None
    fwdbwd_ms: float | None  # median over repeats of (fwd + bwd) of the same call
    x_torch: float | None  # baseline_ms / fwdbwd_ms: > 1 is faster than torch eager
    pct_floor: float | None  # 100 * floor_ms / fwdbwd_ms
    gb_s: float | None  # min_bytes / fwdbwd time
    peak_mib: float | None  # peak RSS above the inputs, MiB
    retained_mib: float | None  # held between calls by the provider's caches, MiB
    baseline_ms: float | None  # torch eager's fwdbwd_ms for the same case in this run
    floor_ms: float | None  # the case's floor (torch.exp over N×V float32) in this run
    min_bytes: int
    first_call_ms: float | None  # first call, fwd+bwd (includes compilation)
    fwdbwd_min_ms: float | None
    fwdbwd_max_ms: float | None
    repeats: int
    out_ok: str  # "yes" / "no" / "" (not checked)
    grad_ok: str
    mem_method: str  # "hwm" (exact) or "sampled"
    note: str


@dataclass(frozen=True)
class RunInfo:
    machine: str
    cpu: str
    cpus: int
    isa: str
    threads: str
    torch: str
    crossent: str
    numba: str
    python: str
    commit: str
    date: str
    command: str
    warmup: int
    repeats: int
    elapsed_s: float


# --------------------------------------------------------------------------------------------
# machine and versions


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# the x86 vector extensions that decide the kernels' speed and torch's, widest first
ISA_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16", "avx512_vnni",
             "amx_tile", "amx_bf16", "amx_fp16", "avx2", "fma", "f16c")  # fmt: skip


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isa_tag(flags: set[str]) -> str:
    """The vector width class of a CPU: ``"avx512"``, ``"avx2"`` or ``""`` (unknown/other)."""
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if "avx2" in flags else ""


def isa_description(flags: set[str]) -> str:
    """The flags of :data:`ISA_FLAGS` the CPU has, and the vector code torch's CPU kernels
    dispatch to (``torch.backends.cpu.get_cpu_capability``)."""
    import torch

    have = " ".join(f for f in ISA_FLAGS if f in flags) or "no AVX2/AVX-512 flags read"
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # an older torch
        capability = "unknown"
    return f"{have}; torch's CPU kernels: {capability}; Numba compiles for this CPU"


def machine_slug(model: str, cpus: int, isa: str = "") -> str:
    """``"Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"``, 2, ``"avx512"`` ->
    ``"cpu-intel-xeon-platinum-8481c-avx512-2c"``: the hardware, not the host name."""
    s = model.lower()
    s = re.sub(r"\((r|tm)\)|@.*$|\bcpu\b|\bprocessor\b", " ", s)
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return f"cpu-{s or 'unknown'}{'-' + isa if isa else ''}-{cpus}c"


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "not installed"


def git_commit() -> str:
    """``HEAD`` of the checkout crossent is imported from, ``+dirty`` if tracked files changed;
    ``"unknown"`` outside a checkout. Read-only (``GIT_OPTIONAL_LOCKS=0``: no index refresh)."""
    here = Path(__file__).resolve().parent
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        head = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            env=env,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            env=env,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}+dirty" if status else head


def run_info(
    argv: Sequence[str] | None,
    warmup: int,
    repeats: int,
    results: Iterable[dict[str, Any]],
    elapsed_s: float,
) -> RunInfo:
    import torch

    import crossent

    model, cpus, flags = cpu_model(), cpu_count(), cpu_flags()
    threads = sorted({int(r["threads"]) for r in results if "threads" in r})
    args = list(sys.argv[1:] if argv is None else argv)
    return RunInfo(
        machine=machine_slug(model, cpus, isa_tag(flags)),
        cpu=model,
        cpus=cpus,
        isa=isa_description(flags),
        threads=",".join(map(str, threads)) or str(torch.get_num_threads()),
        torch=torch.__version__,
        crossent=crossent.__version__,
        numba=_version("numba"),
        python=platform.python_version(),
        commit=git_commit(),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        command=shlex.join(["crossent", "bench", *args]),
        warmup=warmup,
        repeats=repeats,
        elapsed_s=elapsed_s,
    )


# --------------------------------------------------------------------------------------------
# rows


def _fwdbwd(res: dict[str, Any]) -> list[float]:
    return [f + b for f, b in zip(res.get("fwd_ms", []), res.get("bwd_ms", []), strict=True)]


def _ok(v: Any) -> str:
    return "" if v is None else ("yes" if v else "no")


def _row(case: Case, label: str, res: dict[str, Any], min_bytes: int, has_bwd: bool) -> Row:
    fb = _fwdbwd(res)
    t = median(fb) if fb else None
    peak, retained = res.get("peak_bytes"), res.get("retained_bytes")
    notes = []
    if "error" in res:
        notes.append(res["error"])
    if res.get("check_note"):
        notes.append(f"MISMATCH {res['check_note']}")
    if retained and retained >= 2**20:
        notes.append(f"keeps {retained / 2**20:,.0f} MiB between calls")
    if res.get("mem_method") == "sampled":
        notes.append("peak sampled every 1 ms")
    first = res.get("first_call_ms")
    if has_bwd and t and first and first > 2 * t + 100:  # compilation (torch.compile, numba)
        notes.append(f"first call {first / 1e3:.1f} s")
    return Row(
        case=case.label,
        family=case.family,
        shape=case.shape_text,
        dtype=case.dtype,
        provider=label,
        backend=str(res.get("backend", "")),
        fwd_ms=median(res["fwd_ms"]) if fb else None,
        bwd_ms=median(res["bwd_ms"]) if fb and has_bwd else None,
        fwdbwd_ms=t,
        x_torch=None,
        pct_floor=None,
        gb_s=min_bytes / (t * 1e-3) / 1e9 if t else None,
        peak_mib=None if peak is None else peak / 2**20,
        retained_mib=None if retained is None else retained / 2**20,
        baseline_ms=None,
        floor_ms=None,
        min_bytes=min_bytes,
        first_call_ms=res.get("first_call_ms"),
        fwdbwd_min_ms=min(fb) if fb else None,
        fwdbwd_max_ms=max(fb) if fb else None,
        repeats=len(fb),
        out_ok=_ok(res.get("out_ok")),
        grad_ok=_ok(res.get("grad_ok")),
        mem_method=str(res.get("mem_method", "")),
        note="; ".join(notes),
    )


def build_rows(
    cases: Sequence[Case], tasks: Sequence[Task], results: dict[Task, dict[str, Any]]
) -> list[Row]:
    """One row per (case, provider) that ran, then the case's floor row; ratios filled in."""
    fams = families()
    rows: list[Row] = []
    for case in cases:
        fam = fams[case.family]
        block = [
            _row(case, t.provider.name, results[t], fam.min_bytes(case), True)
            for t in tasks
            if t.case == case
        ]
        base = next((r.fwdbwd_ms for r in block if r.provider == fam.baseline), None)
        floor_case = fam.floor(case)
        floor_ms = None
        ftasks = [t for t in tasks if floor_case is not None and t.case == floor_case]
        if floor_case is not None and ftasks:
            # The first floor provider is the floor; the others are context in its note.
            fmin = fams[floor_case.family].min_bytes(floor_case)
            label = f"floor ({floor_case.family} {floor_case.dtype})"
            frow = _row(case, label, results[ftasks[0]], fmin, False)
            frow.fwd_ms = frow.bwd_ms = None
            for t in ftasks[1:]:
                other = _fwdbwd(results[t])
                if other:
                    what = t.provider.about or t.provider.name
                    extra = f"{what}: {_ms(median(other))} ms"
                    frow.note = f"{frow.note}; {extra}" if frow.note else extra
            floor_ms = frow.fwdbwd_ms
            block.append(frow)
        for r in block:
            r.baseline_ms, r.floor_ms = base, floor_ms
            if r.fwdbwd_ms:
                r.x_torch = base / r.fwdbwd_ms if base else None
                r.pct_floor = 100 * floor_ms / r.fwdbwd_ms if floor_ms else None
        rows += block
    return rows


# --------------------------------------------------------------------------------------------
# Markdown

COLUMNS = (
    ("case", "case"),
    ("dtype", "dtype"),
    ("provider", "provider"),
    ("fwd_ms", "fwd ms"),
    ("bwd_ms", "bwd ms"),
    ("fwdbwd_ms", "fwd+bwd ms"),
    ("x_torch", "× torch"),
    ("pct_floor", "% of floor"),
    ("gb_s", "GB/s"),
    ("peak_mib", "peak MiB above inputs"),
    ("note", "note"),
)


def _ms(v: float | None) -> str:
    if v is None:
        return "—"
    return (
        f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}" if v >= 1 else f"{v:.3f}"
    )


def _cell(key: str, r: Row) -> str:
    v = getattr(r, key)
    if key.endswith("_ms"):
        return _ms(v)
    if v is None:
        return "—"
    if key == "x_torch":
        return f"{v:.2f}×"
    if key == "pct_floor":
        return f"{v:.0f}%" if v >= 10 else f"{v:.1f}%"
    if key == "gb_s":
        return f"{v:.1f}"
    if key == "peak_mib":
        return f"{v:,.0f}"
    if key == "provider" and r.backend and r.backend not in r.provider:
        return f"{v} ({r.backend})"
    return str(v).replace("|", "\\|")


def header_lines(info: RunInfo) -> list[str]:
    return [
        f"machine: {info.machine} ({info.cpu}, {info.cpus} CPUs, torch threads {info.threads})",
        f"instruction set: {info.isa}",
        f"versions: torch {info.torch}, crossent {info.crossent}, numba {info.numba}, "
        f"python {info.python}; commit {info.commit}",
        f"date: {info.date}; run took {info.elapsed_s:.0f} s",
        f"command: {info.command}",
        f"timing: median of {info.repeats} calls after {info.warmup} warm-up; each "
        "(case, provider) in a fresh process",
        "× torch = torch-eager fwd+bwd ms / this fwd+bwd ms (> 1 is faster); % of floor = "
        "floor ms / this fwd+bwd ms, the floor being torch.exp over N×V float32 into a "
        "preallocated output (one exp per element) for the families on logits, and the three "
        "matmuls of that size for linear_ce (N×D×V; its baseline torch-eager is the matmul "
        "followed by F.cross_entropy); GB/s = minimum traffic (2·N·V·b for ce, 5·N·V·b for "
        "softmax, 2·(N·D + V·D)·b for linear_ce) / fwd+bwd time; peak = resident memory above "
        "the inputs during one fwd+bwd",
    ]


def markdown(rows: Sequence[Row], info: RunInfo, notes: Sequence[str]) -> str:
    lines = [f"- {h}" for h in header_lines(info)] + [""]
    lines.append("| " + " | ".join(h for _, h in COLUMNS) + " |")
    lines.append(
        "|"
        + "|".join(
            "---" if k in ("case", "dtype", "provider", "note") else "---:" for k, _ in COLUMNS
        )
        + "|"
    )
    for r in rows:
        lines.append("| " + " | ".join(_cell(k, r) for k, _ in COLUMNS) + " |")
    if notes:
        lines += ["", *(f"- note: {n}" for n in notes)]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# files


def write_csv(rows: Sequence[Row], info: RunInfo, notes: Sequence[str], path: Path) -> None:
    names = [f.name for f in fields(Row)]
    with open(path, "w", newline="") as f:
        for h in header_lines(info):
            f.write(f"# {h}\n")
        for n in notes:
            f.write(f"# note: {n}\n")
        w = csv.DictWriter(f, fieldnames=names)
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv(v) for k, v in asdict(r).items()})


def _csv(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV written by :func:`write_csv` (header comments skipped)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def write_plot(rows: Sequence[Row], info: RunInfo, path: Path) -> None:
    """Grouped bars: fwd+bwd ms per (case, dtype), one bar per provider, log scale; the floor
    of each group as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    groups: list[tuple[str, str]] = []
    for r in rows:
        if (r.case, r.dtype) not in groups:
            groups.append((r.case, r.dtype))
    provs = [p for p in dict.fromkeys(r.provider for r in rows) if not p.startswith("floor")]
    width = 0.8 / max(len(provs), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(groups) + 2), 5.2))
    for j, prov in enumerate(provs):
        xs, ys = [], []
        for i, g in enumerate(groups):
            hit = next((r for r in rows if (r.case, r.dtype) == g and r.provider == prov), None)
            if hit is not None and hit.fwdbwd_ms:
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(hit.fwdbwd_ms)
        backend = next((r.backend for r in rows if r.provider == prov and r.backend), "")
        label = f"{prov} ({backend})" if backend and backend not in prov else prov
        ax.bar(xs, ys, width, label=label)
    for i, g in enumerate(groups):
        fl = next((r.floor_ms for r in rows if (r.case, r.dtype) == g and r.floor_ms), None)
        if fl:
            kw: dict[str, Any] = {"label": "floor (one exp per element)"} if i == 0 else {}
            ax.hlines(fl, i - 0.45, i + 0.45, colors="k", linestyles="dashed", **kw)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_ylabel("forward+backward, ms (median, log scale)")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{c}\n{d}" for c, d in groups], fontsize=8, rotation=30, ha="right")
    ax.set_title(f"crossent bench — {info.machine}, torch {info.torch}, {info.date}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_all(
    rows: Sequence[Row],
    info: RunInfo,
    notes: Sequence[str],
    out_dir: Path,
    stem: str,
    plot: bool,
    err: TextIO,
) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.md"
    write_csv(rows, info, notes, csv_path)
    md_path.write_text(markdown(rows, info, notes) + "\n")
    paths = [csv_path, md_path]
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(
                "note: matplotlib is not installed; no plot written "
                "(pip install matplotlib, or use --no-plot)",
                file=err,
            )
        else:
            png = out_dir / f"{stem}.png"
            write_plot(rows, info, png)
            paths.append(png)
    return paths
