"""Peak resident memory of one call, above what the process held just before it (Linux).

Method (see benchmarks/README.md): free what the previous call left, empty the buffer caches
providers keep between calls (:data:`CACHE_RELEASERS`; what they held is reported apart as
"retained"), ``gc.collect()`` and ``malloc_trim(0)`` so freed heap pages are no longer resident,
read the current RSS from
``/proc/self/statm`` as the baseline, reset the kernel's high-water mark by writing ``5`` to
``/proc/self/clear_refs`` (Linux >= 4.0), run the call, and read ``VmHWM`` from
``/proc/self/status``. The peak above the baseline is exact: every page the call touched,
including output and gradient that are still alive, counted at the moment of the peak. Where
the high-water mark cannot be reset, a thread samples RSS every millisecond instead (it can
miss a spike shorter than that) and the row says ``sampled``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import importlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def hwm_bytes() -> int:
    """Peak resident set size since start or the last :func:`reset_hwm` (``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("VmHWM not in /proc/self/status")


def reset_hwm() -> bool:
    """Reset ``VmHWM`` to the current RSS; ``False`` where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return hwm_bytes() <= rss_bytes() + 64 * _PAGE  # check that it took effect
    except OSError:
        return False


# (module, function) pairs that release memory a provider keeps between calls, e.g. crossent's
# reuse of gradient buffers. Missing ones are skipped. A cache that stays resident would make
# the measured call look free: with it emptied, the call's peak is what a steady-state training
# step holds above its inputs (a cache only keeps buffers that are in use at that peak).
CACHE_RELEASERS: tuple[tuple[str, str], ...] = (("crossent.backends.buffers", "empty_cache"),)


def release_caches() -> None:
    """Call every importable function of :data:`CACHE_RELEASERS`."""
    for module, name in CACHE_RELEASERS:
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        fn()


def release_freed() -> None:
    """Collect garbage and hand freed heap pages back to the kernel (glibc ``malloc_trim``)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


class _Sampler(threading.Thread):
    def __init__(self, period_s: float = 1e-3) -> None:
        super().__init__(daemon=True)
        self.period_s = period_s
        self.peak = rss_bytes()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.period_s)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, rss_bytes())


@dataclass(frozen=True)
class Peak:
    """``peak``: bytes above the baseline at the call's high-water mark; ``retained``: bytes
    that provider caches held before the call (released for the baseline); ``method``:
    ``"hwm"`` (exact) or ``"sampled"`` (1 ms polling)."""

    peak: int
    retained: int
    method: str


def peak_above(call: Callable[[], T]) -> tuple[T, Peak]:
    """Run ``call()`` and measure its peak resident memory above what was resident before."""
    release_freed()
    before = rss_bytes()
    release_caches()
    release_freed()
    base = rss_bytes()
    retained = max(0, before - base)
    if reset_hwm():
        result = call()
        return result, Peak(max(0, hwm_bytes() - base), retained, "hwm")
    sampler = _Sampler()
    sampler.start()
    try:
        result = call()
    finally:
        peak = sampler.stop()
    return result, Peak(max(0, peak - base), retained, "sampled")
