"""One (case, provider) measurement, run in a fresh child process (see :mod:`.runner`).

Sequence: allocate the inputs; warm up (the first call's time is kept: it includes compilation
for torch.compile and numba); one call under :func:`.memory.peak_above` for the peak memory
above the inputs, whose output and gradient are then checked against the float64 oracle; then
``repeats`` timed calls. Before every call the previous output and ``.grad`` are freed, as
``zero_grad(set_to_none=True)`` does in training. The result is a plain dict sent back on a pipe.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import torch
from torch import Tensor

from . import memory
from .cases import Case, Family, Inputs, NotApplicable, family
from .providers import Provider


def _free(inputs: Inputs) -> None:
    for leaf in inputs.leaves:
        leaf.grad = None


def _once(fn: Callable[..., Tensor], inputs: Inputs) -> tuple[Tensor, float, float]:
    """One forward(+backward); returns the output and the two times in seconds."""
    t0 = time.perf_counter()
    out = fn(*inputs.args)
    t1 = time.perf_counter()
    if inputs.leaves:
        out.backward(inputs.grad_output)
    t2 = time.perf_counter()
    return out, t1 - t0, t2 - t1


def _describe(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text if len(text) <= 240 else text[:237] + "..."


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the measurement described by ``spec`` (see :func:`.runner.task_spec`)."""
    case = Case.from_json(spec["case"])
    provider = Provider.from_json(spec["provider"])
    warmup, repeats = int(spec["warmup"]), int(spec["repeats"])
    res: dict[str, Any] = {"threads": torch.get_num_threads()}
    fam: Family = family(case.family)
    inputs = fam.make_inputs(case, int(spec.get("seed", 0)))
    if provider.kind == "crossent":
        from crossent import dispatch, set_buffer_reuse

        set_buffer_reuse(provider.reuse)  # each task runs in a process of its own

        try:
            res["backend"] = dispatch.resolve(provider.backend, inputs.args[0]).name
            function = {"ce": "cross_entropy"}.get(case.family, case.family)
            if provider.backend == "auto" and dispatch.hands_off(function, inputs.args[0]):
                res["backend"] = "torch's own"  # a problem too small for the kernels
        except Exception as exc:
            res["error"] = _describe(exc)
            return res
    try:
        fn = fam.callable(provider, case)
    except NotApplicable as exc:
        res["error"] = f"not applicable: {exc}"
        return res
    except ImportError as exc:
        res["error"] = f"import failed: {_describe(exc)}"
        return res

    phase = "first call"
    try:
        out, f, b = _once(fn, inputs)
        res["first_call_ms"] = (f + b) * 1e3
        del out
        for _ in range(warmup - 1):
            _free(inputs)
            out, f, b = _once(fn, inputs)
            del out
        phase = "peak-memory call"
        _free(inputs)
        (out, f, b), peak = memory.peak_above(lambda: _once(fn, inputs))
        res["peak_bytes"], res["retained_bytes"] = peak.peak, peak.retained
        res["mem_method"] = peak.method
        if spec.get("check", "sample") != "off":
            phase = "check"
            chk = fam.check(case, inputs, out, full=spec.get("check") == "full")
            res["out_ok"], res["grad_ok"], res["check_note"] = chk.out_ok, chk.grad_ok, chk.message
        del out
        phase = "timed calls"
        fwd, bwd = [], []
        for _ in range(repeats):
            _free(inputs)
            out, f, b = _once(fn, inputs)
            del out
            fwd.append(f * 1e3)
            bwd.append(b * 1e3)
        res["fwd_ms"], res["bwd_ms"] = fwd, bwd
    except Exception as exc:
        res["error"] = f"{phase}: {_describe(exc)}"
        res["traceback"] = traceback.format_exc(limit=-3)
    return res


def _exit_with_parent() -> None:
    """Exit when the forkserver that forked us goes away (the runner was killed): an orphaned
    measurement would only load the machine."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def run_task(spec: dict[str, Any], conn: Connection) -> None:
    """Child-process entry point: measure, send the result dict, exit."""
    _exit_with_parent()
    try:
        os.dup2(2, 1)  # library chatter goes to stderr; the parent's stdout is the table
    except OSError:
        pass
    try:
        result = measure(spec)
    except BaseException as exc:  # inputs could not even be built (e.g. out of memory)
        result = {"error": _describe(exc), "traceback": traceback.format_exc(limit=-3)}
    conn.send(result)
    conn.close()
