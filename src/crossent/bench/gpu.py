"""``crossent bench --device cuda``: crossent's Triton kernels against torch and its peers on a
GPU, in one process, each figure against a floor measured in the same run.

Floors: the device's copy bandwidth (``dst.copy_(src)`` of 1 GiB: bytes read plus written per
second) and its bfloat16 matmul rate (an 8192³ ``torch.mm``). Cross entropy must read the
logits once and write their gradient once (``2·N·V·b`` bytes), softmax forward+backward reads
and writes five times that row block (``5·N·V·b``); the linear head does ``6·N·V·D`` useful
FLOPs (its three matmuls). Each (case, provider): two untimed calls, then ``repeats``
forward+backward steps timed with CUDA events (median), and the peak of
``torch.cuda.max_memory_allocated`` above the inputs during one step (the input gradients
included). crossent's loss is checked against torch eager's on the same inputs.

Providers: ``crossent`` (``backend="triton"``), ``torch-eager``, ``torch-compile``,
``torch-linear-ce`` (``F.linear_cross_entropy``, the linear head), and Liger,
cut-cross-entropy and quack when importable (a peer that fails is a row with its error).
Writes ``gpu.md`` and ``gpu.csv`` under ``--out`` (default
``benchmarks/results/<device>/gpu/``).
"""

from __future__ import annotations

import csv
import importlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F

# (family, N, V, D (linear only), dtype): the shapes
CASES: list[tuple[str, int, int, int, torch.dtype]] = [
    ("ce", 16384, 131072, 0, torch.bfloat16),
    ("ce", 8192, 32000, 0, torch.float32),
    ("ce", 65536, 1000, 0, torch.bfloat16),
    ("ce", 2048, 262144, 0, torch.bfloat16),
    ("softmax", 8192, 32000, 0, torch.bfloat16),
    ("linear_ce", 8192, 128256, 4096, torch.bfloat16),
]
QUICK_CASES: list[tuple[str, int, int, int, torch.dtype]] = [
    ("ce", 64, 1000, 0, torch.float32),
    ("softmax", 32, 500, 0, torch.float32),
    ("linear_ce", 64, 1000, 32, torch.float32),
]


@dataclass
class Row:
    case: str
    dtype: str
    provider: str
    ms: float = float("nan")
    rate: str = ""  # GB/s or TFLOP/s
    of_floor: float = float("nan")  # fraction of the bandwidth or matmul floor
    peak_mib: float = float("nan")
    limit_mib: float = float("nan")  # gradients (+ 256 MiB for the linear head)
    check: str = ""
    note: str = ""


class Timer:
    """Wall time of a callable: CUDA events on a GPU, ``perf_counter`` elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, fn: Callable[[], Any], repeats: int) -> float:
        times = []
        for _ in range(repeats):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def copy_bandwidth(device: torch.device, timer: Timer, nbytes: int = 1 << 30) -> float:
    """Bytes read plus written per second by ``dst.copy_(src)``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    timer.sync()
    ms = timer.ms(lambda: dst.copy_(src), 10)
    return 2 * nbytes / (ms * 1e-3)


def matmul_rate(device: torch.device, timer: Timer, n: int = 8192) -> float:
    """FLOP/s of an ``n``³ matmul in bfloat16 (float32 off the GPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    timer.sync()
    ms = timer.ms(lambda: a @ b, 10)
    return 2 * n**3 / (ms * 1e-3)


def _peer(module: str, attr: str) -> Any:
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception:  # not installed, or an API this harness does not know
        return None


def providers(family: str, device: torch.device) -> dict[str, Callable[..., torch.Tensor]]:
    """Name -> the loss (or output) callable for ``family``; peers only when importable."""
    import crossent
    from crossent.dispatch import BackendName

    backend: BackendName = "triton" if device.type == "cuda" else "auto"

    def softmax(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, -1)

    def matmul_ce(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy((h @ w.T).float(), t)

    out: dict[str, Callable[..., torch.Tensor]] = {}
    if family == "ce":
        out["crossent"] = lambda x, t: crossent.cross_entropy(x, t, backend=backend)
        out["torch-eager"] = F.cross_entropy
        out["torch-compile"] = torch.compile(F.cross_entropy, dynamic=False)
        liger = _peer("liger_kernel.transformers.functional", "liger_cross_entropy")
        if liger is not None:
            out["liger-kernel"] = liger
        quack = _peer("quack.cross_entropy", "cross_entropy")
        if quack is not None:
            out["quack"] = lambda x, t: quack(x, t).mean()
    elif family == "softmax":
        out["crossent"] = lambda x: crossent.softmax(x, -1, backend=backend)
        out["torch-eager"] = softmax
        out["torch-compile"] = torch.compile(softmax, dynamic=False)
    else:
        out["crossent"] = lambda h, w, t: crossent.linear_cross_entropy(h, w, t, backend=backend)
        out["torch-eager"] = matmul_ce
        out["torch-compile"] = torch.compile(matmul_ce, dynamic=False)
        if hasattr(F, "linear_cross_entropy"):
            out["torch-linear-ce"] = lambda h, w, t: F.linear_cross_entropy(h, w, t)
        cce = _peer("cut_cross_entropy", "linear_cross_entropy")
        if cce is not None:
            out["cut-cross-entropy"] = lambda h, w, t: cce(h, w, t)
        liger = _peer("liger_kernel.transformers.functional", "liger_fused_linear_cross_entropy")
        if liger is not None:
            out["liger-kernel"] = lambda h, w, t: liger(h, w, t)
    return out


def _inputs(family: str, n: int, v: int, d: int, dtype: torch.dtype,
            device: torch.device) -> list[torch.Tensor]:  # fmt: skip
    g = torch.Generator(device=device).manual_seed(0)
    if family == "linear_ce":
        h = torch.randn(n, d, device=device, dtype=dtype, generator=g).requires_grad_()
        w = (torch.randn(v, d, device=device, dtype=dtype, generator=g) * d**-0.5)
        t = torch.randint(0, v, (n,), device=device, generator=g)
        return [h, w.requires_grad_(), t]
    x = (torch.randn(n, v, device=device, dtype=dtype, generator=g) * 3).requires_grad_()
    if family == "softmax":
        return [x]
    return [x, torch.randint(0, v, (n,), device=device, generator=g)]


def measure(family: str, n: int, v: int, d: int, dtype: torch.dtype, device: torch.device,
            repeats: int, timer: Timer, bandwidth: float, flops: float,
            err: TextIO) -> list[Row]:  # fmt: skip
    """Every provider of one case: time, rate, fraction of the floor, peak memory, check."""
    label = f"{family} {n}x{v}" + (f"x{d}" if d else "")
    dname = str(dtype).replace("torch.", "")
    b = torch.finfo(dtype).bits // 8
    inputs = _inputs(family, n, v, d, dtype, device)
    leaves = [a for a in inputs if a.requires_grad]
    grad_bytes = sum(a.numel() * a.element_size() for a in leaves)
    limit = grad_bytes + (256 << 20) if family == "linear_ce" else float("nan")
    floor_bytes = (2 if family == "ce" else 5) * n * v * b
    rows: list[Row] = []
    results: dict[str, torch.Tensor] = {}
    # softmax's backward takes this incoming gradient (a loss's is 1)
    g_out = torch.randn(n, v, device=device, dtype=dtype) if family == "softmax" else None
    for name, fn in providers(family, device).items():
        row = Row(label, dname, name, limit_mib=limit / 2**20)
        print(f"  {label} {dname} {name} ...", file=err, flush=True)

        def step(fn: Callable[..., torch.Tensor] = fn) -> torch.Tensor:
            for a in leaves:
                a.grad = None
            out = fn(*inputs)
            out.backward(g_out)
            return out.detach()

        try:
            if family != "softmax":
                results[name] = step().float()
            step()
            timer.sync()
            if device.type == "cuda":
                for a in leaves:
                    a.grad = None
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                step()
                timer.sync()
                row.peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
            row.ms = timer.ms(step, repeats)
        except Exception as exc:  # a peer's failure is a row, not the end of the run
            row.note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            rows.append(row)
            continue
        if family == "linear_ce":
            rate = 6 * n * v * d / (row.ms * 1e-3)
            row.rate, row.of_floor = f"{rate / 1e12:.3g} TFLOP/s", rate / flops
        else:
            row.rate = f"{floor_bytes / (row.ms * 1e-3) / 1e9:.3g} GB/s"
            row.of_floor = floor_bytes / (row.ms * 1e-3) / bandwidth
        rows.append(row)
    reference = results.get("torch-eager")
    for row in rows:  # every loss against torch eager's on the same inputs
        if reference is not None and row.provider in results:
            got = results[row.provider]
            close = torch.allclose(got, reference, rtol=2e-2, atol=1e-3)
            row.check = "ok" if close else f"differs: {float(got):.6g} vs {float(reference):.6g}"
    return rows


def _mib(v: float) -> str:
    return "" if v != v else f"{v:,.0f}"  # NaN: not measured (off the GPU) or no limit


def run(device: torch.device, quick: bool, repeats: int, out_dir: Path | None, out: TextIO,
        err: TextIO) -> int:  # fmt: skip
    """Run every case; print the table; write it under ``out_dir``. Returns 1 when crossent's
    loss differs from torch's, else 0."""
    timer = Timer(device)
    start = time.perf_counter()
    bandwidth = copy_bandwidth(device, timer, (64 << 20) if quick else (1 << 30))
    flops = matmul_rate(device, timer, 512 if quick else 8192)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; copy {bandwidth / 1e9:.0f} GB/s; matmul {flops / 1e12:.1f} TFLOP/s "
          f"({'bfloat16' if device.type == 'cuda' else 'float32'})", file=err)  # fmt: skip
    rows: list[Row] = []
    for family, n, v, d, dtype in QUICK_CASES if quick else CASES:
        rows += measure(family, n, v, d, dtype, device, repeats, timer, bandwidth, flops, err)
        if device.type == "cuda":  # the case's inputs are gone: their blocks back to the device
            torch.cuda.empty_cache()
    elapsed = time.perf_counter() - start
    header = (
        f"device: {name}, torch {torch.__version__}; floors measured in this run: copy "
        f"{bandwidth / 1e9:.0f} GB/s (read + write), matmul {flops / 1e12:.1f} TFLOP/s; "
        f"forward+backward, median of {repeats}; {elapsed:.0f} s in all"
    )
    cols = ["case", "dtype", "provider", "ms", "rate", "of floor", "peak MiB", "limit MiB",
            "check", "note"]  # fmt: skip
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r.case, r.dtype, r.provider, f"{r.ms:.3g}", r.rate, f"{r.of_floor:.0%}",
                 _mib(r.peak_mib), _mib(r.limit_mib), r.check, r.note]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table, file=out)
    folder = out_dir or Path("benchmarks") / "results" / name.lower().replace(" ", "-") / "gpu"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ("gpu-quick.md" if quick else "gpu.md")).write_text(table + "\n")
    with open(folder / ("gpu-quick.csv" if quick else "gpu.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([r.case, r.dtype, r.provider, r.ms, r.rate, r.of_floor, r.peak_mib,
                        r.limit_mib, r.check, r.note])  # fmt: skip
    print(f"wrote {folder}", file=err)
    return 1 if any(r.provider == "crossent" and r.check.startswith("differs") for r in rows) else 0
