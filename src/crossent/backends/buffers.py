"""Reuse of large CPU output buffers (gradients, softmax outputs) across calls.

A fresh logits-sized buffer costs its first-touch page faults on every call: on Linux the
allocator returns large blocks to the system when they are freed, so each training step would
fault in (and zero) hundreds of megabytes again. Instead, crossent keeps the last few buffers
it handed out and hands one out again once nothing else references its storage — in a training
loop, once ``optimizer.zero_grad()`` or the end of backward has released it. This is what
torch's CUDA caching allocator does for GPU memory; torch has no such cache for CPU memory.

A buffer is reused only when crossent's own reference is the last one (checked under a lock),
so a gradient the caller still holds is never overwritten. :func:`empty_cache` releases every
cached buffer. Only buffers of at least :data:`MIN_BYTES` are cached; GPU memory is left to
torch's own allocator.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import Tensor

MIN_BYTES = 1 << 20  # smaller buffers come from malloc's free lists anyway
SLOTS_PER_SIZE = 2  # e.g. a softmax output and its gradient, alive at the same time

_lock = threading.Lock()
_cache: dict[tuple[torch.dtype, int], list[Tensor]] = {}


def _storage_use_count() -> Callable[[Tensor], int] | None:
    fn = getattr(torch._C, "_storage_Use_Count", None)
    if fn is None:  # an older or newer torch without it: no reuse, plain allocation
        return None
    return lambda t: int(fn(t.untyped_storage()._cdata)) - 1  # minus the temporary wrapper


_use_count = _storage_use_count()


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised contiguous tensor, from the cache when a free buffer of its size exists."""
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or nbytes < MIN_BYTES or _use_count is None:
        return torch.empty(shape, dtype=dtype, device=device)
    key = (dtype, numel)
    with _lock:
        slots = _cache.setdefault(key, [])
        for buf in slots:
            if _use_count(buf) == 1:  # only the cache holds it
                return _share(buf, shape)
        buf = torch.empty(numel, dtype=dtype)
        slots.append(buf)
        if len(slots) > SLOTS_PER_SIZE:
            slots.pop(0)  # forget the oldest (its user keeps it alive as long as needed)
        return _share(buf, shape)


def _share(buf: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """A contiguous tensor of ``shape`` on ``buf``'s storage that is not a view of it (callers
    may ``detach_()`` it, as ``zero_grad`` does with gradients)."""
    sizes = list(shape)
    strides = [1] * len(sizes)
    for i in range(len(sizes) - 2, -1, -1):
        strides[i] = strides[i + 1] * sizes[i + 1]
    out = torch.empty(0, dtype=buf.dtype)
    with torch.no_grad():
        out.set_(buf.untyped_storage(), 0, sizes, strides)
    return out


def empty_cache() -> None:
    """Release every cached buffer (those still in use are freed when their users let go)."""
    with _lock:
        _cache.clear()


def cached_bytes() -> int:
    """Bytes held by the cache, in use or not."""
    with _lock:
        return sum(b.numel() * b.element_size() for slots in _cache.values() for b in slots)
