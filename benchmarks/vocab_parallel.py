"""Vocabulary-parallel cross entropy against one process on the whole batch.

    python benchmarks/vocab_parallel.py [--rows 4096] [--classes 32000] [--world 2] [--repeat 7]
                                        [--reuse]

Times forward+backward (median of ``--repeat`` calls after one warm-up) of
``crossent.distributed.vocab_parallel_cross_entropy`` with ``--world`` ranks of one thread each
over gloo, every rank holding an equal slice of the classes, and of ``crossent.cross_entropy``
on the whole ``rows × classes`` float32 logits in one process with ``--world`` threads. Prints
both medians and their ratio. ``--reuse``: both with ``crossent.set_buffer_reuse(True)`` (the
gradient buffers kept between calls, no first-touch page faults). The ranks are processes on
this machine: a timing run, not a
test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def _median_ms(step, repeat: int, barrier=None) -> float:
    step()
    times = []
    for _ in range(repeat):
        if barrier is not None:
            barrier()
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _rank(
    rank: int, world: int, store: str, rows: int, classes: int, repeat: int, reuse: bool
) -> None:
    import torch.distributed as dist

    import crossent
    from crossent.distributed import vocab_parallel_cross_entropy

    crossent.set_buffer_reuse(reuse)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, classes, generator=g)
    t = torch.randint(0, classes, (rows,), generator=g)
    lo, hi = rank * classes // world, (rank + 1) * classes // world
    xs = x[:, lo:hi].contiguous().requires_grad_()

    def step() -> None:
        xs.grad = None
        loss = vocab_parallel_cross_entropy(xs, t, vocab_start=lo, vocab_size=classes)
        loss.backward()

    ms = _median_ms(step, repeat, dist.barrier)
    if rank == 0:
        print(f"RESULT {ms:.2f}", flush=True)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--classes", type=int, default=32000)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rank is not None:
        _rank(a.rank, a.world, a.store, a.rows, a.classes, a.repeat, a.reuse)
        return

    import crossent

    crossent.set_buffer_reuse(a.reuse)
    torch.set_num_threads(a.world)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.rows, a.classes, generator=g).requires_grad_()
    t = torch.randint(0, a.classes, (a.rows,), generator=g)

    def whole() -> None:
        x.grad = None
        crossent.cross_entropy(x, t).backward()

    one = _median_ms(whole, a.repeat)
    with tempfile.TemporaryDirectory() as d:
        args = [sys.executable, __file__, "--rows", str(a.rows), "--classes", str(a.classes),
                "--world", str(a.world), "--repeat", str(a.repeat), "--store", f"{d}/store",
                *(["--reuse"] if a.reuse else [])]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs = [
            subprocess.Popen([*args, "--rank", str(r)], stdout=subprocess.PIPE, text=True, env=env)
            for r in range(a.world)
        ]
        outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        sys.exit("a rank failed")
    par = float(next(line for line in outs[0].splitlines() if line.startswith("RESULT")).split()[1])
    mode = "buffers reused" if a.reuse else "fresh buffers"
    print(f"{a.rows}x{a.classes} float32 forward+backward, median of {a.repeat}, {mode}")
    print(f"  one process, {a.world} threads, cross_entropy:        {one:8.1f} ms")
    print(f"  {a.world} ranks x 1 thread, vocab_parallel_cross_entropy: {par:8.1f} ms"
          f"  ({par / one:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
