"""The fused CPU backend: Numba kernels (:mod:`._kernels`) behind the primitive protocol.

Tensors are handed to the kernels as NumPy views, without copies: float32 and float64 as
they are, bfloat16 as ``int16`` bits and float16 as ``uint16`` bits (converted to float32
inside the kernels, element by element). Kernels run on ``torch.get_num_threads()`` threads,
so crossent never uses more cores than torch is allowed.

``nll_loss`` and the extra gradients of probability targets (target, weight) come from the
portable torch backend: the first is a gather and a scatter of ``M`` elements with nothing to
fuse, the second is rare and runs chunked.

What the backend guarantees (:mod:`._lanes`, :mod:`._runtime`):

- **Results independent of compilation.** Every sum is added up in a fixed order, so a kernel
  gives the same bits whether it was compiled in this process or loaded from Numba's cache,
  whichever process compiled it and whatever else the process compiled first, on any number
  of threads (on one instruction set: an AVX-512 machine and an AVX2 one may differ in the
  last bit of a sum's terms where contraction differs).
- **Fork-safe.** When the backend is first used, and unless the user chose a layer
  (``NUMBA_THREADING_LAYER`` or ``numba.config.THREADING_LAYER``) or Numba's threads already
  run, Numba's threads are started with its ``forksafe`` layer: TBB (the ``tbb`` package, a
  dependency on Linux x86-64) or else Numba's ``workqueue``, never GNU OpenMP, under which a
  forked child (DataLoader workers, ``multiprocessing`` fork pools) is killed by Numba.
- **Cache.** Kernels are compiled on first use and cached on disk by Numba (``cache=True``):
  next to the sources when that directory is writable, else in Numba's per-user cache
  directory (``NUMBA_CACHE_DIR`` overrides both). A cache that cannot be written (a read-only
  installation or a read-only prebuilt ``NUMBA_CACHE_DIR``) is read all the same; kernels it
  lacks are compiled and, when no location is writable, kept in a private temporary directory
  removed at exit. A damaged cache entry (truncated, overwritten) is compiled again and
  rewritten, with a warning, instead of failing every call.
- **Compiles only what a call runs.** Each parallel kernel is made per set of the options that
  change its code (``_kernels.ce_index_kernel`` and its siblings, through
  ``_runtime.specialised``): label smoothing, the transform of the logits (none, temperature,
  soft-cap), z-loss, softmax or log_softmax. The other options are run-time arguments.
"""

from __future__ import annotations

import importlib

import numba
import numpy as np
import torch
from torch import Tensor

from .. import buffers
from ..base import (
    INDEX_PARTS,
    PROB_PARTS,
    Backend,
    Merged,
    RowOptions,
    RowStats,
    TokenRows,
    Unsupported,
    acc_dtype,
    no_classes,
    prob_acc_dtype,
    slice_targets,
)
from . import _runtime

# with a private cache directory where no location is writable (see _runtime.declare)
_kernels = _runtime.declare(lambda: importlib.import_module(f"{__name__}._kernels"))
_sums = _runtime.declare(lambda: importlib.import_module(f"{__name__}._sums"))

from . import _lanes, _math, _memory  # noqa: E402  (imported by _kernels)

_runtime.install_caches(_kernels, _lanes, _math, _memory, _sums)
_runtime.use_forksafe_threads()

_NUMPY_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16}


def as_numpy(t: Tensor) -> np.ndarray:
    """A NumPy view of a contiguous CPU tensor; 16-bit floats as their bit patterns."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy()  # int16 bits mean bfloat16 to the kernels
    if t.dtype == torch.float16:
        return t.view(torch.int16).numpy().view(np.uint16)  # uint16 bits mean float16
    return t.numpy()


# Outputs at least this large are written with non-temporal stores (straight to memory, no
# read-for-ownership); smaller ones with ordinary stores, so they stay in cache for whatever
# reads them next (the backward, the next layer).
STREAM_BYTES = 32 * 2**20


def _streams(out: Tensor, *inputs: Tensor) -> bool:
    """Whether to stream ``out``: large, and not written over an input (whose lines the
    kernel has just read into cache)."""
    ptr = out.data_ptr()
    return out.nbytes >= STREAM_BYTES and all(t.data_ptr() != ptr for t in inputs)


def _rows(t: Tensor) -> Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _set_threads() -> None:
    """Use the threads torch may use (numba's pool is capped at its own start-up size)."""
    cap = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
    numba.set_num_threads(max(1, min(torch.get_num_threads(), cap)))


def _check_cpu(*tensors: Tensor | None) -> None:
    for t in tensors:
        if t is not None and t.device.type != "cpu":
            raise RuntimeError(
                f"backend 'cpu' runs on CPU tensors only, got a tensor on {t.device}; "
                "use backend='auto' or move the tensor to the CPU"
            )


class CpuBackend(Backend):
    """Fused Numba kernels for CPU tensors; float16/bfloat16/float32/float64 logits."""

    name = "cpu"
    columns_in_place = True
    defers = {  # noqa: RUF012
        "cross_entropy_prob_forward": "logits, targets and weights of different precisions",
        "cross_entropy_partial": "no rows or no classes in the slice",
        "cross_entropy_prob_partial": "no rows or no classes in the slice; mixed precisions",
        "cross_entropy_prob_partial_grad": "logits and targets of different precisions",
        "token_stats_forward": "no rows or no classes",
        "token_stats_backward": "no rows or no classes",
    }

    # float32 slices of a 16-bit chunk gradient: cache-sized
    product_slice_bytes = 2 * 2**20

    def widened_products(self, dtype: torch.dtype) -> bool:
        """True on CPUs without native instructions for the format (AVX512-BF16 or AMX for
        bfloat16, AMX-FP16 for float16), where torch's 16-bit matmuls reach 14 GFLOP/s at best
        and float32 ones about 90 (2-core AVX2 machine). Decided by the CPU's features alone,
        so results never depend on a timing."""
        if dtype not in (torch.float16, torch.bfloat16):
            return False
        bf16 = dtype == torch.bfloat16
        native = "_is_avx512_bf16_supported" if bf16 else "_is_amx_fp16_supported"
        probes = (native, "_is_amx_tile_supported")
        return not any(getattr(torch.cpu, name, lambda: False)() for name in probes)

    narrow_sums = True

    def add_narrow(self, hi: Tensor, lo: Tensor, part: Tensor, first: bool, last: bool) -> None:
        _check_cpu(part)
        _sums.add_part(as_numpy(hi), lo.numpy(), part.numpy(), first, last)

    # ---- softmax / log_softmax ---------------------------------------------------------------

    def softmax_forward(self, x: Tensor, log: bool) -> Tensor:
        _check_cpu(x)
        x = _rows(x.detach())
        out = buffers.empty(x.shape, x.dtype, x.device)
        _set_threads()
        proto = np.empty(0, dtype=np.float64 if x.dtype == torch.float64 else np.float32)
        kernel = _runtime.specialised(_kernels.softmax_fwd_kernel, log)
        kernel(as_numpy(x), as_numpy(out), proto, _streams(out))
        return out

    def softmax_backward(self, grad: Tensor, out: Tensor, log: bool) -> Tensor:
        _check_cpu(grad, out)
        grad, out = _rows(grad), _rows(out)
        gx = buffers.empty(out.shape, out.dtype, out.device)
        _set_threads()
        proto = np.empty(0, dtype=np.float64 if out.dtype == torch.float64 else np.float32)
        kernel = _runtime.specialised(_kernels.softmax_bwd_kernel, log)
        kernel(as_numpy(grad), as_numpy(out), as_numpy(gx), proto, _streams(gx, grad))
        return gx

    # ---- cross entropy -------------------------------------------------------------------------

    def cross_entropy_forward(
        self,
        x: Tensor,
        target: Tensor,
        weight: Tensor | None,
        opts: RowOptions,
        grad_out: Tensor | None = None,
        grad_scale: Tensor | None = None,
    ) -> RowStats:
        _check_cpu(x, target, weight)
        m, v = x.shape
        acc = acc_dtype(x.dtype)
        if v == 0 or m == 0:
            return no_classes(m, acc, x.device) if v == 0 else _empty_stats(acc)
        x = _rows(x.detach())
        loss = torch.empty(m, dtype=acc)
        lse = torch.empty(m, dtype=acc)
        w, w_total = _weight(weight, acc)
        grad, want = _grad_target(grad_out, x)
        _set_threads()
        eps = opts.label_smoothing
        kernel = _runtime.specialised(
            _kernels.ce_index_kernel, eps > 0, _transform_kind(opts), opts.z_loss != 0
        )
        kernel(
            as_numpy(x), _rows(target).numpy(), w, weight is not None, w_total,
            opts.ignore_index, _scalar(1.0 - eps, acc), _scalar(eps / v, acc),
            _scalar(opts.z_loss, acc), _scale(grad_scale, acc), as_numpy(loss), as_numpy(lse),
            as_numpy(grad), want, _streams(grad, x), *_transform(opts, acc),
        )
        _finish_grad(grad_out, grad)
        return RowStats(loss, lse)

    def cross_entropy_prob_forward(
        self,
        x: Tensor,
        target: Tensor,
        weight: Tensor | None,
        opts: RowOptions,
        grad_out: Tensor | None = None,
        grad_scale: Tensor | None = None,
    ) -> RowStats:
        _check_cpu(x, target, weight)
        m, v = x.shape
        acc = _prob_acc(x, target, weight)
        if v == 0 or m == 0:
            return no_classes(m, acc, x.device) if v == 0 else _empty_stats(acc)
        x, target = _rows(x.detach()), _rows(target.detach())
        loss = torch.empty(m, dtype=acc)
        lse = torch.empty(m, dtype=acc)
        w, _ = _weight(weight, acc)
        grad, want = _grad_target(grad_out, x)
        _set_threads()
        eps = opts.label_smoothing
        kernel = _runtime.specialised(_kernels.ce_prob_kernel, _transform_kind(opts))
        kernel(
            as_numpy(x), as_numpy(target), w, weight is not None,
            _scalar(1.0 - eps, acc), _scalar(eps / v, acc), _scalar(opts.z_loss, acc),
            _scale(grad_scale, acc),
            as_numpy(loss), as_numpy(lse), as_numpy(grad), want, _streams(grad, x),
            *_transform(opts, acc),
        )
        _finish_grad(grad_out, grad)
        return RowStats(loss, lse)

    def cross_entropy_partial(
        self, x: Tensor, target: Tensor, weight: Tensor | None, opts: RowOptions, start: int,
        total: int,
    ) -> Tensor:  # fmt: skip
        _check_cpu(x, target, weight)
        m, v = x.shape
        if v == 0 or m == 0:
            raise Unsupported
        acc = acc_dtype(x.dtype)
        x = _rows(x.detach())
        w, w_total = _weight(None if weight is None else weight[start : start + v], acc)
        parts = torch.empty(INDEX_PARTS, m, dtype=torch.float64)
        _set_threads()
        kernel = _runtime.specialised(
            _kernels.ce_partial_kernel, opts.label_smoothing > 0, _transform_kind(opts)
        )
        kernel(
            as_numpy(x), _rows(target).numpy(), opts.ignore_index, start, w, weight is not None,
            np.float64(v if weight is None else w_total), np.empty(0, dtype=_np_dtype(acc)),
            *_transform(opts, acc), parts.numpy(),
        )
        return parts

    def cross_entropy_partial_grad(
        self, x: Tensor, target: Tensor, weight: Tensor | None, opts: RowOptions, start: int,
        total: int, merged: Merged, grad_out: Tensor, grad_scale: Tensor | None = None,
    ) -> None:  # fmt: skip
        _check_cpu(x, target, weight, grad_out)
        m, v = x.shape
        if v == 0 or m == 0:
            return
        acc = acc_dtype(x.dtype)
        eps = opts.label_smoothing
        st = slice_targets(target, weight, opts, start, v, acc)
        sc = torch.ones((), dtype=acc) if grad_scale is None else grad_scale.to(acc)
        sc = sc.expand(m)
        a = (merged.coef.to(acc) * sc).contiguous()
        b = (sc * (eps / total)).contiguous()
        c = (st.term * sc).contiguous()
        w, _ = _weight(None if weight is None else weight[start : start + v], acc)
        grad, _ = _grad_target(grad_out, x)
        _set_threads()
        kernel = _runtime.specialised(
            _kernels.ce_partial_grad_kernel, eps > 0, _transform_kind(opts)
        )
        kernel(
            as_numpy(_rows(x.detach())), st.col.numpy(), st.keep.numpy(),
            merged.lse.to(acc).contiguous().numpy(), a.numpy(), b.numpy(), c.numpy(), w,
            weight is not None, as_numpy(grad), _streams(grad, x), *_transform(opts, acc),
        )
        _finish_grad(grad_out, grad)

    def cross_entropy_prob_partial(
        self, x: Tensor, target: Tensor, weight: Tensor | None, opts: RowOptions, start: int,
        total: int,
    ) -> Tensor:  # fmt: skip
        _check_cpu(x, target, weight)
        m, v = x.shape
        acc = _prob_acc(x, target, weight)
        if v == 0 or m == 0:
            raise Unsupported
        w, _ = _weight(None if weight is None else weight[start : start + v], acc)
        parts = torch.empty(PROB_PARTS, m, dtype=torch.float64)
        eps = opts.label_smoothing
        _set_threads()
        kernel = _runtime.specialised(_kernels.ce_prob_partial_kernel, _transform_kind(opts))
        kernel(
            as_numpy(_rows(x.detach())), as_numpy(_rows(target.detach())), w, weight is not None,
            _scalar(1.0 - eps, acc), _scalar(eps / total, acc), np.empty(0, dtype=_np_dtype(acc)),
            *_transform(opts, acc), parts.numpy(),
        )  # fmt: skip
        return parts

    def cross_entropy_prob_partial_grad(
        self, x: Tensor, target: Tensor, weight: Tensor | None, opts: RowOptions, start: int,
        total: int, merged: Merged, grad_out: Tensor, grad_scale: Tensor | None = None,
    ) -> None:  # fmt: skip
        _check_cpu(x, target, weight, grad_out)
        m, v = x.shape
        acc = _prob_acc(x, target, weight)
        if v == 0 or m == 0:
            return
        sc = torch.ones((), dtype=acc) if grad_scale is None else grad_scale.to(acc)
        sc = sc.expand(m)
        a = (merged.coef.to(acc) * sc).contiguous()
        w, _ = _weight(None if weight is None else weight[start : start + v], acc)
        grad, _ = _grad_target(grad_out, x)
        eps = opts.label_smoothing
        _set_threads()
        kernel = _runtime.specialised(_kernels.ce_prob_partial_grad_kernel, _transform_kind(opts))
        kernel(
            as_numpy(_rows(x.detach())), as_numpy(_rows(target.detach())), w, weight is not None,
            _scalar(1.0 - eps, acc), _scalar(eps / total, acc),
            merged.lse.to(acc).contiguous().numpy(), a.numpy(), sc.contiguous().numpy(),
            as_numpy(grad), _streams(grad, x), *_transform(opts, acc),
        )  # fmt: skip
        _finish_grad(grad_out, grad)

    def cross_entropy_columns(
        self,
        xt: Tensor,
        target: Tensor,
        weight: Tensor | None,
        opts: RowOptions,
        grad_scale: Tensor | None,
        chunk_rows: int,
        want_grad: bool = True,
    ) -> Tensor:
        """As the base method, for CPU logits with contiguous rows: one kernel walking the rows
        of ``xt`` (no transposition); anything else as the base does."""
        ok = (
            xt.device.type == "cpu"
            and xt.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
            and xt.dim() == 2
            and xt.stride(1) == 1
            and xt.shape[0] > 0
        )
        if not ok:
            return super().cross_entropy_columns(
                xt, target, weight, opts, grad_scale, chunk_rows, want_grad
            )
        _check_cpu(xt, target, weight)
        v, n = xt.shape
        acc = acc_dtype(xt.dtype)
        loss = torch.empty(n, dtype=acc)
        lse = torch.empty(n, dtype=acc)
        w, w_total = _weight(weight, acc)
        _set_threads()
        eps = opts.label_smoothing
        cap, inv_cap, inv_t = _transform(opts, acc)
        kernel = _runtime.specialised(
            _kernels.ce_index_cols_kernel, eps > 0, _transform_kind(opts)
        )
        kernel(
            as_numpy(xt), _rows(target).numpy(), w, weight is not None, w_total,
            opts.ignore_index, _scalar(1.0 - eps, acc), _scalar(eps / v, acc),
            _scalar(opts.z_loss, acc), _scale(grad_scale, acc), as_numpy(loss), as_numpy(lse),
            want_grad, cap, inv_cap, inv_t, numba.get_num_threads(),
        )
        return loss


    # ---- token statistics: every row in one call (the kernels keep no temporaries) -----------

    def token_stats_forward(
        self, x: Tensor, target: Tensor, opts: RowOptions, chunk_rows: int
    ) -> TokenRows:
        _check_cpu(x, target)
        if x.numel() == 0:
            raise Unsupported
        x = _rows(x.detach())
        m = x.shape[0]
        acc = acc_dtype(x.dtype)
        out = TokenRows.empty(m, acc, x.device)
        _set_threads()
        cap, inv_cap, inv_t = _transform(opts, acc)
        kernel = _runtime.specialised(_kernels.stats_fwd_kernel, _transform_kind(opts))
        kernel(
            as_numpy(x), _rows(target).numpy(), opts.ignore_index, cap, inv_cap, inv_t,
            as_numpy(out.logprob), as_numpy(out.entropy), as_numpy(out.lse), out.argmax.numpy(),
        )
        return out

    def token_stats_backward(
        self, x: Tensor, target: Tensor, opts: RowOptions, g_lp: Tensor, g_h: Tensor,
        out: Tensor, chunk_rows: int,
    ) -> None:  # fmt: skip
        _check_cpu(x, target, out)
        if x.numel() == 0:
            raise Unsupported
        x = _rows(x.detach())
        acc = acc_dtype(x.dtype)
        _set_threads()
        cap, inv_cap, inv_t = _transform(opts, acc)
        kernel = _runtime.specialised(_kernels.stats_bwd_kernel, _transform_kind(opts))
        kernel(
            as_numpy(x), _rows(target).numpy(), opts.ignore_index, _rows(g_lp).numpy(),
            _rows(g_h).numpy(), cap, inv_cap, inv_t, as_numpy(out),
            np.empty(0, dtype=_np_dtype(acc)), _streams(out, x),
        )

def _prob_acc(x: Tensor, target: Tensor, weight: Tensor | None) -> torch.dtype:
    """The accumulation dtype of probability targets; :class:`Unsupported` for mixed
    precisions (e.g. float32 logits, float64 targets), which take the portable path."""
    acc = prob_acc_dtype(x, target, weight)
    if acc != acc_dtype(x.dtype) or acc != acc_dtype(target.dtype):
        raise Unsupported
    return acc


def _transform_kind(opts: RowOptions) -> int:
    """What a specialised kernel does to the logits: 0 nothing, 1 divides them by a
    temperature, 2 soft-caps them (and divides them by any temperature)."""
    if opts.softcap is not None:
        return 2
    return 0 if opts.temperature == 1.0 else 1


def _transform(opts: RowOptions, acc: torch.dtype) -> tuple[np.floating, ...]:
    """``(cap, 1/cap, 1/T)`` for the kernels; ``cap = 0`` means no soft-capping."""
    cap = opts.softcap
    return (
        _scalar(0.0 if cap is None else cap, acc),
        _scalar(1.0 if cap is None else 1.0 / cap, acc),
        _scalar(1.0 / opts.temperature, acc),
    )


def _np_dtype(acc: torch.dtype) -> type:
    return np.float64 if acc == torch.float64 else np.float32


def _scalar(value: float, acc: torch.dtype) -> np.floating:
    return _np_dtype(acc)(value)


def _scale(grad_scale: Tensor | None, acc: torch.dtype) -> np.ndarray:
    """The gradient scales as the kernels take them: one value, or one per row."""
    if grad_scale is None:
        return np.ones(1, dtype=_np_dtype(acc))
    return grad_scale.detach().to(acc).reshape(-1).contiguous().numpy()


def _weight(weight: Tensor | None, acc: torch.dtype) -> tuple[np.ndarray, np.floating]:
    """Weights in the compute dtype (an empty array when there are none) and their sum."""
    if weight is None:
        return np.empty(0, dtype=_np_dtype(acc)), _scalar(0.0, acc)
    w = weight.detach().to(acc).contiguous().numpy()
    return w, w.sum(dtype=_np_dtype(acc))


def _grad_target(grad_out: Tensor | None, x: Tensor) -> tuple[Tensor, bool]:
    """The contiguous buffer the kernel writes (``grad_out`` itself when possible)."""
    if grad_out is None:
        return torch.empty((x.shape[0], 0), dtype=x.dtype), False
    if grad_out.is_contiguous():
        return grad_out, True
    return torch.empty(grad_out.shape, dtype=grad_out.dtype), True


def _finish_grad(grad_out: Tensor | None, grad: Tensor) -> None:
    if grad_out is not None and grad_out.data_ptr() != grad.data_ptr():
        grad_out.copy_(grad)


def _empty_stats(acc: torch.dtype) -> RowStats:
    return RowStats(torch.empty(0, dtype=acc), torch.empty(0, dtype=acc))

