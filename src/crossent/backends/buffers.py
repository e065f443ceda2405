"""Optional reuse of large CPU output buffers (gradients, softmax outputs) across calls.

A fresh logits-sized buffer costs its first-touch page faults on every call: on Linux the
allocator returns large blocks to the system when they are freed, so each training step
faults in (and zeroes) hundreds of megabytes again; torch's own functions pay the same for
each of theirs. With reuse switched on (:func:`set_buffer_reuse`), crossent keeps the last
few buffers it handed out and hands one out again once nothing else references its storage
(in a training loop, once the end of backward or ``optimizer.zero_grad()`` has released it),
as torch's CUDA caching allocator does for GPU memory.

Reuse is off by default: a kept buffer stays resident between calls, through the rest of the
backward pass, the optimizer step and the next forward pass, where it can raise a training
step's peak memory above what torch's own function gives. Switch it on where the memory is
there to spare and the calls repeat at one size (benchmarks, inference loops).

A buffer is handed out again only when crossent's own reference is the last one (checked
under a lock): a gradient the caller still holds, a view of it, or its ``untyped_storage()``
keeps it from being overwritten. :func:`empty_cache` releases every cached buffer. Only
buffers of at least :data:`MIN_BYTES` are cached; GPU memory is left to torch's own
allocator.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

import torch
from torch import Tensor

MIN_BYTES = 1 << 20  # smaller buffers come from malloc's free lists anyway
SLOTS_PER_SIZE = 2  # e.g. a softmax output and its gradient, alive at the same time

_lock = threading.Lock()
_cache: dict[tuple[torch.dtype, int], list[Tensor]] = {}


_reuse = False


def set_buffer_reuse(enabled: bool) -> bool:
    """Switch the reuse of large CPU gradient and softmax buffers on or off (off by default;
    see :mod:`crossent.backends.buffers`); returns the previous setting. Switching it off also
    releases the cached buffers."""
    global _reuse
    previous = _reuse
    _reuse = bool(enabled)
    if not _reuse:
        empty_cache()
    return previous


def buffer_reuse() -> bool:
    """Whether large CPU buffers are reused across calls (:func:`set_buffer_reuse`)."""
    return _reuse


def _storage_references() -> Callable[[Tensor], tuple[int, int]] | None:
    """A function giving, for a tensor, the C++ use count of its storage and the Python
    reference count of the storage's Python object, both as read from a local variable;
    None on a torch without the use-count query (then nothing is reused)."""
    fn = getattr(torch._C, "_storage_Use_Count", None)
    if fn is None:
        return None

    def references(t: Tensor) -> tuple[int, int]:
        storage = t.untyped_storage()  # torch keeps one Python object per storage
        return int(fn(storage._cdata)), sys.getrefcount(storage)

    return references


_references = _storage_references()
# the counts of a storage that only one tensor refers to: anything above them (another tensor
# or view, or the caller holding the storage object itself) means the buffer is in use
_ALONE = None if _references is None else _references(torch.empty(1))


def _free(buf: Tensor) -> bool:
    """Whether the cache's own tensor is the only holder of ``buf``'s storage."""
    assert _references is not None and _ALONE is not None
    uses, refs = _references(buf)
    return uses <= _ALONE[0] and refs <= _ALONE[1]


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised contiguous tensor, from the cache when a free buffer of its size exists."""
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if not _reuse or device.type != "cpu" or nbytes < MIN_BYTES or _references is None:
        return torch.empty(shape, dtype=dtype, device=device)
    key = (dtype, numel)
    with _lock:
        slots = _cache.setdefault(key, [])
        for buf in slots:
            if _free(buf):
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
