"""Fused linear + cross entropy: ``cross_entropy(input @ W.T + b, target)`` without the logits.

Rows are processed in chunks whose logits fit a memory budget. For each chunk, one matmul
writes its logits into a reused buffer; the backend's cross-entropy primitive turns them, in
place, into the gradient of the logits (already scaled for the reduction); two more matmuls
add that chunk's share of d(input) and d(weight). The full ``(N, V)`` logits never exist, and
the forward pass leaves only the gradients behind: backward multiplies them by the incoming
gradient, or hands them over unchanged when it is 1.

``reduction='none'`` cannot fold its (not yet known) per-row incoming gradient into a weight
gradient summed over rows, so its forward computes losses only and its backward recomputes the
chunks' logits with the incoming gradient at hand. Rows whose target is ``ignore_index`` are
dropped before the projection. d(weight) and d(bias) of float16/bfloat16 parameters accumulate
in float32 and are rounded once at the end, except d(weight) of a bfloat16 parameter on a backend
that keeps such sums in 24 bits (:attr:`~crossent.backends.base.Backend.narrow_sums`, the
CPU's): there the running sum is the gradient's own storage and one byte more per element
(:class:`NarrowSum`), not a float32 array of twice the gradient's size.

Without a ``chunk_bytes``, chunks of CPU tensors are as large as the memory allowance left after
what the call holds besides them (:func:`default_chunk_rows`): :data:`ALLOWANCE` above the inputs
and the gradients; on other devices they hold :data:`DEFAULT_CHUNK_BYTES` of logits.

float16/bfloat16 class-index chunks on a backend whose column-wise cross entropy works in place
(the CPU's) hold their logits transposed, ``(V, rows)``, and that pass turns them into their
gradient in place (see :func:`_by_columns` for why the layout matters); where the backend says
so (:meth:`~crossent.backends.base.Backend.widened_products`: CPUs without native 16-bit
matmul instructions) every product of such a chunk runs in float32, slice by slice of W's rows
of at most its ``product_slice_bytes``.

With at most D kept rows and d(weight) wanted, there is a single chunk, held in d(weight)'s
own storage (:func:`_run_transposed`): each matmul then runs once at full size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from . import _composite
from ._autograd import (
    Inputs,
    StatsOptions,
    mean_denominator,
    reduce_rows,
    scale,
    scale_saved,
    stats_outputs,
)
from ._transforms import batched, differentiable_backward
from .backends.base import Backend, RowOptions, acc_dtype, prob_acc_dtype

# logits of one chunk of rows, at most, for the token statistics of a linear head (and the
# linear head given rows only through options): with fewer, larger chunks the matmuls re-read
# W and re-write d(weight) fewer times (float32 4096×1024×32000 on 2 AVX2 cores: the whole step
# took 1.05–1.15× the time of three full-size matmuls in 393-row chunks, 0.99–1.04× in 491-row
# ones)
DEFAULT_CHUNK_BYTES = 60 * 2**20

# what linear_cross_entropy on CPU tensors may hold above its inputs and its gradients: chunks
# are sized from what is left of it (default_chunk_rows); on other devices they hold
# DEFAULT_CHUNK_BYTES of logits
ALLOWANCE = 64 * 2**20
# chunks never shrink below this many bytes of logits (where the call's other buffers leave less
# of the allowance: a float32 accumulator larger than it)
MIN_CHUNK_BYTES = 16 * 2**20


@dataclass(frozen=True)
class LinearOptions:
    backend: Backend
    rows: RowOptions
    reduction: str  # 'none' | 'mean' | 'sum'
    chunk_rows: int
    grad_enabled: bool = True
    # the loss's dtype: torch's promotion of logits, probability targets and class weights
    # (float32 under autocast); the input's dtype when None
    out_dtype: torch.dtype | None = None
    # autocast's linear layer: input, weight and bias cast to this dtype for the matmuls; the
    # parameters' gradients then come back in their own dtypes, with no rounding to this one
    compute_dtype: torch.dtype | None = None
    # a 'sum' divided by this 0-d float64 tensor (transformers' num_items_in_batch), the
    # division folded into the gradient's scale
    divisor: Tensor | None = None


def chunk_rows(num_classes: int, itemsize: int, chunk_bytes: int | None, rows: int | None) -> int:
    """Rows per chunk: ``rows`` when given, else as many as ``chunk_bytes`` of logits hold."""
    if rows is not None:
        return max(1, rows)
    budget = DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    return max(1, budget // max(1, num_classes * itemsize))


def default_chunk_rows(
    n: int, v: int, d: int, dtype: torch.dtype, w_dtype: torch.dtype, be: Backend
) -> int:
    """Rows per chunk of linear_cross_entropy when no size is given: as many as fit in what
    :data:`ALLOWANCE` leaves after the call's other buffers, ``n`` rows of ``(n, d)`` input
    (``dtype``: the matmuls') and ``(v, d)`` weight (``w_dtype``: the parameter's). Those
    buffers: the d(weight) sum beyond the gradient itself (a byte per element for
    :class:`NarrowSum`, a float32 array for other 16-bit parameters), float32 slices of 16-bit
    products, per-row vectors; each row of a chunk costs its logits and the float32 copies of
    its input row and of its d(input) row. At least :data:`MIN_CHUNK_BYTES` of logits."""
    itemsize = dtype.itemsize
    fixed = 24 * n + 4 * v  # losses, kept-row indices; a float32 d(bias)
    if w_dtype in (torch.float16, torch.bfloat16):
        fixed += v * d * (1 if narrow(be, w_dtype) else 4)
    if dtype in (torch.float16, torch.bfloat16):
        fixed += 3 * be.product_slice_bytes
    per_row = v * itemsize + 2 * d * 4 + d * itemsize
    left = max(ALLOWANCE - fixed, MIN_CHUNK_BYTES * per_row // max(1, v * itemsize))
    return max(1, left // per_row)


def narrow(be: Backend, w_dtype: torch.dtype) -> bool:
    """Whether d(weight) of a ``w_dtype`` parameter is summed by :class:`NarrowSum`."""
    return w_dtype == torch.bfloat16 and be.narrow_sums


class NarrowSum:
    """d(weight) of a bfloat16 parameter summed over chunks in 24 bits: each float32 product
    added in float32, the sum kept as the bfloat16 gradient's own elements and a byte more each
    (:meth:`~crossent.backends.base.Backend.add_narrow`), the last chunk's sum rounded to
    bfloat16 from float32. A 16-bit significand: each addition is off by at most 2**-15 of its
    sum (a float32 array's by 2**-24, a bfloat16 running sum's by 2**-8), a small part of the
    result's final rounding (2**-9) unless the sum cancels; the sum uses 3 bytes an element
    where a float32 array and the result take 6. ``chunks``: how many chunks will add."""

    def __init__(self, shape: torch.Size, device: torch.device, be: Backend, chunks: int):
        self.hi = torch.empty(shape, dtype=torch.bfloat16, device=device)
        self.lo = torch.empty(shape, dtype=torch.uint8, device=device)
        self.be, self.chunks, self.done = be, chunks, 0
        self.part: Tensor | None = None  # the float32 products, reused slice after slice

    @property
    def shape(self) -> torch.Size:
        return self.hi.shape

    def add_product(self, lo: int, hi: int, a: Tensor, b: Tensor) -> None:
        """Add the float32 product ``a @ b`` to rows ``lo:hi``; each row once per chunk."""
        if self.part is None or self.part.shape[0] < hi - lo:  # a chunk of fewer rows can
            # take larger slices: the buffer grows to the largest
            self.part = None
            self.part = torch.empty((hi - lo, b.shape[1]), dtype=torch.float32, device=b.device)
        part = torch.mm(a, b, out=self.part[: hi - lo])
        last = self.done + 1 == self.chunks
        self.be.add_narrow(self.hi[lo:hi], self.lo[lo:hi], part, self.done == 0, last)

    def end_chunk(self) -> None:
        self.done += 1

    def result(self) -> Tensor:
        """The sums, rounded to bfloat16 by the last chunk (zeros when there was none)."""
        assert self.done == self.chunks, (self.done, self.chunks)
        self.part = None
        return self.hi if self.chunks else self.hi.zero_()


def _wide(dtype: torch.dtype) -> torch.dtype:
    """Accumulator dtype of a parameter gradient: float32 for 16-bit floats."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _Chunks:
    """The row chunks of one call: which rows of ``x`` and ``target`` each chunk covers."""

    def __init__(self, target: Tensor, prob: bool, ignore_index: int, size: int) -> None:
        n = target.shape[0]
        self.kept: Tensor | None = None
        if not prob:
            keep = target != ignore_index
            if not bool(keep.all()):
                self.kept = keep.nonzero().squeeze(1)
        self.count = n if self.kept is None else int(self.kept.numel())
        # as many chunks as ``size`` rows each need, evened out: no larger buffer than that
        # number of chunks requires, and no small last chunk (1 row when nothing is kept)
        chunks = -(-self.count // max(1, size))
        self.size = -(-self.count // chunks) if chunks else 1

    def __len__(self) -> int:
        return -(-self.count // self.size)

    def __iter__(self) -> Iterator[slice | Tensor]:
        """Each chunk's rows: a slice, or the kept rows' indices when some are dropped."""
        for lo in range(0, self.count, self.size):
            hi = min(lo + self.size, self.count)
            yield slice(lo, hi) if self.kept is None else self.kept[lo:hi]


def _take(t: Tensor, rows: slice | Tensor) -> Tensor:
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)


def logits_into(buf: Tensor, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``x @ w.T (+ b)``, ``(n, V)``, written into the contiguous ``buf`` (any shape)."""
    out = buf.view(-1)[: x.shape[0] * w.shape[0]].view(x.shape[0], w.shape[0])
    if b is None:
        torch.mm(x, w.t(), out=out)
    else:
        torch.addmm(b, x, w.t(), out=out)
    return out


def _logits_t(
    buf: Tensor, x: Tensor, w: Tensor, b: Tensor | None, wide: bool, slice_bytes: int
) -> Tensor:
    """``(x @ w.T + b).T``, ``(V, n)``, written into the contiguous ``buf``; when ``wide``, slice by
    slice of W's rows in float32 (see :func:`_slices`), each product rounded once."""
    out = buf.view(-1)[: x.shape[0] * w.shape[0]].view(w.shape[0], x.shape[0])
    if not wide:
        if b is None:
            torch.mm(w, x.t(), out=out)
        else:
            torch.addmm(b.unsqueeze(1), w, x.t(), out=out)
        return out
    xf = x.float()
    for lo, hi in _slices(w.shape[0], max(x.shape[0], w.shape[1]), slice_bytes):
        ws = w[lo:hi].float()
        if b is None:
            out[lo:hi].copy_(torch.mm(ws, xf.t()))
        else:
            out[lo:hi].copy_(torch.addmm(b[lo:hi, None].float(), ws, xf.t()))
    return out


def _slices(v: int, width: int, slice_bytes: int) -> Iterator[tuple[int, int]]:
    """Row ranges of a ``(v, ·)`` operand such that a float32 slice ``width`` wide holds at
    most ``slice_bytes``."""
    step = max(1, slice_bytes // max(1, width * 4))
    for lo in range(0, v, step):
        yield lo, min(lo + step, v)


def _add_widened_chunk_grads(
    grads: Sums, gt: Tensor, xc: Tensor, w: Tensor, rows: slice | Tensor, slice_bytes: int
) -> None:
    """As :func:`add_chunk_grads` from ``gt``, the chunk's logit gradient transposed
    ``(V, n)``, with every product in float32 slice by slice of W's rows: d(input) sums its
    slices in float32 and is rounded once."""
    dx, dw, db = grads
    n = gt.shape[1]
    dxf = None if dx is None else torch.zeros((n, w.shape[1]), dtype=torch.float32, device=w.device)
    xf = None if dw is None else xc.float()
    for lo, hi in _slices(w.shape[0], max(n, w.shape[1]), slice_bytes):
        gs = gt[lo:hi].float()
        if dxf is not None:
            dxf.addmm_(gs.t(), w[lo:hi].float())
        if isinstance(dw, NarrowSum) and xf is not None:
            dw.add_product(lo, hi, gs, xf)
        elif isinstance(dw, Tensor) and xf is not None:
            dw[lo:hi].addmm_(gs, xf)
        if db is not None:
            db[lo:hi].add_(gs.sum(1))
    if isinstance(dw, NarrowSum):
        dw.end_chunk()
    if dx is not None and dxf is not None:
        if isinstance(rows, slice):
            dx[rows] = dxf
        else:
            dx.index_copy_(0, rows, dxf.to(dx.dtype))


def _by_columns(x: Tensor, target: Tensor, be: Backend) -> bool:
    """Whether chunks hold their logits transposed: for float16/bfloat16 class-index problems
    on a backend whose column-wise cross entropy works in place. The products then read
    both operands along their contracted dimension or both across it (``W @ x.T`` and
    ``G.T`` as the left factor of ``G @ W``), never one of each: torch's CPU matmuls of 16-bit
    floats without native instructions for them run those mixed layouts tens of times slower
    (``G @ W`` with G and W both row-major, 0.4 GFLOP/s against 14 on AVX2)."""
    return be.columns_in_place and target.dim() == 1 and x.dtype in (torch.float16, torch.bfloat16)


# devices whose matmul has no float32 output for 16-bit operands (aten::mm.dtype): the CPU's,
# and any other found to lack it
_NO_WIDE_OUTPUT = {"cpu"}


def _mm_wide(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """``a @ b`` written in ``dtype`` (float32 from 16-bit operands), where torch has it."""
    out: Tensor = torch.ops.aten.mm.dtype(a, b, dtype)
    return out


def _add_weight_grad(acc: Tensor | NarrowSum, g: Tensor, x: Tensor, slice_bytes: int) -> None:
    """``acc += g.T @ x``, in slices of ``acc``'s rows.

    For float16/bfloat16 g and x the product is not rounded to 16 bits (rounding each chunk's
    partial product would add an error per chunk): on a GPU the matmul of the 16-bit operands
    writes float32 (cuBLAS on tensor cores, ``aten::mm.dtype``); where the matmul has no such
    output (torch's CPU matmuls) the operands are copied to float32 first.
    """
    if isinstance(acc, NarrowSum):
        # float32 slices of g and their products: at most slice_bytes each
        step = max(1, slice_bytes // max(1, max(g.shape[0], x.shape[1]) * 4))
        xf = x.float()
        for lo in range(0, acc.shape[0], step):
            hi = min(lo + step, acc.shape[0])
            acc.add_product(lo, hi, g[:, lo:hi].t().float(), xf)
        acc.end_chunk()
        return
    if acc.dtype == g.dtype:
        acc.addmm_(g.t(), x)
        return
    step = max(1, slice_bytes // max(1, g.shape[0] * acc.element_size()))
    if g.device.type not in _NO_WIDE_OUTPUT:
        try:
            part = _mm_wide(g[:, :step].t(), x, acc.dtype)
        except torch.OutOfMemoryError:
            raise
        except (AttributeError, NotImplementedError, RuntimeError):  # a torch without the
            # overload, or a device without the kernel: raised on dispatch, before any work
            _NO_WIDE_OUTPUT.add(g.device.type)
        else:
            acc[:step] += part
            for lo in range(step, acc.shape[0], step):
                acc[lo : lo + step] += _mm_wide(g[:, lo : lo + step].t(), x, acc.dtype)
            return
    xf = x.to(acc.dtype)
    for lo in range(0, acc.shape[0], step):
        acc[lo : lo + step].addmm_(g[:, lo : lo + step].t().to(acc.dtype), xf)


Grads = tuple[Tensor | None, Tensor | None, Tensor | None]
# gradients being summed over chunks: d(weight) may be a NarrowSum
Sums = tuple[Tensor | None, Tensor | NarrowSum | None, Tensor | None]


def param_grads(
    x: Tensor,
    w: Tensor,
    b: Tensor | None,
    need: tuple[bool, bool, bool],
    be: Backend | None = None,
    chunks: int | None = None,
    w_dtype: torch.dtype | None = None,
) -> Sums:
    """Zeroed gradients of input, weight and bias, for those in ``need``; the weight's and
    bias's accumulate in float32 for 16-bit parameters (see :func:`final_grads`), or the
    weight's in a :class:`NarrowSum` where backend ``be`` keeps narrow sums (``chunks``: how
    many chunks will add to it; ``w_dtype``: the parameter's dtype where ``w`` is cast to
    another for the matmuls)."""
    dx = torch.zeros_like(x) if need[0] else None
    w_dtype = w_dtype or w.dtype
    dw: Tensor | NarrowSum | None = None
    if need[1] and be is not None and chunks is not None and narrow(be, w_dtype) and (
        w.dtype == w_dtype
    ):
        dw = NarrowSum(w.shape, w.device, be, chunks)
    elif need[1]:
        dw = torch.zeros(w.shape, dtype=_wide(w.dtype), device=w.device)
    db = None
    if need[2] and b is not None:
        db = torch.zeros(w.shape[0], dtype=_wide(b.dtype), device=b.device)
    return dx, dw, db


def add_chunk_grads(
    grads: Sums, g: Tensor, xc: Tensor, w: Tensor, rows: slice | Tensor, be: Backend
) -> None:
    """Add one chunk's share, from ``g`` the gradient of its logits and ``xc`` its inputs
    (``rows``: where those rows sit in the input; ``be``: the backend, whose slice size the
    float32 products of 16-bit operands take)."""
    dx, dw, db = grads
    if dx is not None:
        if isinstance(rows, slice):
            torch.mm(g, w, out=dx[rows])
        else:
            dx.index_copy_(0, rows, torch.mm(g, w))
    if dw is not None:
        _add_weight_grad(dw, g, xc, be.product_slice_bytes)
    if db is not None:
        db.add_(g.sum(0, dtype=db.dtype))


def final_grads(grads: Sums, w: Tensor, b: Tensor | None) -> Grads:
    """The accumulated gradients in their parameters' dtypes."""
    dx, dw, db = grads
    if isinstance(dw, NarrowSum):
        dw_out: Tensor | None = dw.result()
        del dw
    else:
        dw_out = None if dw is None else dw.to(w.dtype)
    return (
        dx,
        dw_out,
        None if db is None or b is None else db.to(b.dtype),
    )


def _run(
    x: Tensor,
    w: Tensor,
    b: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    opts: LinearOptions,
    scale: Tensor | None,
    row_grad: Tensor | None,
    need: tuple[bool, bool, bool],
) -> tuple[Tensor, Grads]:
    """One pass over the chunks: per-row losses and, for the ``need``-ed inputs, gradients
    (in their parameters' dtypes).

    ``scale``: the reduction's scalar factor of the gradient; ``row_grad``: per-row incoming
    gradient (``reduction='none'`` backward) — at most one of them is given.
    """
    w_param, b_param = w, b
    cd = opts.compute_dtype
    if cd is not None:  # autocast: the matmuls' operands in its dtype
        x, w, b = x.to(cd), w.to(cd), None if b is None else b.to(cd)
    n, v = x.shape[0], w.shape[0]
    prob = target.dim() == 2
    acc = prob_acc_dtype(x, target, weight) if prob else acc_dtype(x.dtype)
    want = any(need)
    chunks = _Chunks(target, prob, opts.rows.ignore_index, opts.chunk_rows)
    if (
        row_grad is None
        and w.dtype == w_param.dtype  # d(weight) in the logits' storage needs their dtype
        and _transposable(x, w, target, chunks.count, need, opts.backend)
    ):
        return _run_transposed(x, w, b, target, weight, opts, scale, need, chunks)
    loss = torch.zeros(n, dtype=acc, device=x.device)
    grads = param_grads(x, w, b, need, opts.backend, len(chunks), w_param.dtype)
    columns = _by_columns(x, target, opts.backend)
    # a plain allocation, not the reusable-buffer cache: freed (no view of it outlives
    # _chunk) before the gradients are converted to their final dtype, so it never adds to
    # the peak
    buf = torch.empty(chunks.size * v, dtype=x.dtype, device=x.device)
    wide = columns and opts.backend.widened_products(x.dtype)
    for rows in chunks:
        # per-row incoming gradients go into the kernel: the gradient is rounded only once
        sc = scale if row_grad is None else _take(row_grad, rows)
        chunk_loss = _chunk(
            buf, x, w, b, target, weight, opts, sc, grads if want else None, rows, columns, wide
        )
        if isinstance(rows, slice):
            loss[rows] = chunk_loss
        else:
            loss.index_copy_(0, rows, chunk_loss)
    del buf
    return loss, final_grads(grads, w_param, b_param)


def _chunk(
    buf: Tensor,
    x: Tensor,
    w: Tensor,
    b: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    opts: LinearOptions,
    scale: Tensor | None,
    grads: Sums | None,
    rows: slice | Tensor,
    columns: bool,
    wide: bool,
) -> Tensor:
    """One chunk of :func:`_run`: its rows' losses; adds their share to ``grads`` if given.
    ``buf`` holds the chunk's logits, then their gradient."""
    be = opts.backend
    xc, tc = _take(x, rows), _take(target, rows)
    if columns:  # logits (V, rows): their gradient (rows, V) as a transposed view
        lt = _logits_t(buf, xc, w, b, wide, be.product_slice_bytes)
        loss = be.cross_entropy_columns(
            lt, tc, weight, opts.rows, scale, buf.numel() // w.shape[0], grads is not None
        )
        logits = lt.t()
    else:
        logits = logits_into(buf, xc, w, b)
        forward = be.cross_entropy_prob_forward if target.dim() == 2 else be.cross_entropy_forward
        grad_out = logits if grads is not None else None
        loss = forward(logits, tc, weight, opts.rows, grad_out, scale).loss
    if grads is not None and wide:
        _add_widened_chunk_grads(grads, lt, xc, w, rows, be.product_slice_bytes)
    elif grads is not None:
        add_chunk_grads(grads, logits, xc, w, rows, be)  # logits: now their gradient
    return loss


DW_BLOCK_BYTES = 16 * 2**20  # one block of d(weight) rows, written back by the transposed pass


def _transposable(
    x: Tensor, w: Tensor, target: Tensor, kept: int, need: tuple[bool, ...], be: Backend
) -> bool:
    """Whether :func:`_run_transposed` applies: class-index targets, d(weight) wanted and of
    the logits' dtype, the kept rows' logits fitting in its storage (at most D rows); float32
    and float64 on any backend, float16/bfloat16 where their chunks take the columns
    (:func:`_by_columns`)."""
    return (
        need[1]
        and x.dtype == w.dtype
        and (x.dtype in (torch.float32, torch.float64) or _by_columns(x, target, be))
        and 0 < kept <= x.shape[1]
        and target.dim() == 1
    )


def _run_transposed(
    x: Tensor,
    w: Tensor,
    b: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    opts: LinearOptions,
    scale: Tensor | None,
    need: tuple[bool, bool, bool],
    chunks: _Chunks,
) -> tuple[Tensor, Grads]:
    """As :func:`_run`, for at most D kept rows: all their logits, transposed ``(V, n)``, are
    computed at once into the storage of d(weight) (``V·n <= V·D`` elements), turned into
    their gradient in place by the backend's column-wise cross entropy (the CPU backend's
    kernel walks the transposed rows; the portable one transposes a chunk of rows at a time
    through a buffer), and then feed d(input)
    and d(bias) and, block of vocabulary rows by block from the last, d(weight) itself — each
    block's product written over the logits it was computed from, never over ones still to be
    read (those sit before it, and ``n <= D``). Every matmul runs once at full size, and W and
    d(weight) are read and written once instead of once per chunk. 16-bit gradients are
    rounded once from float32 sums (every product in float32 where the backend widens them), so no
    float32 d(weight) accumulator is needed."""
    n, d = x.shape
    v = w.shape[0]
    acc = acc_dtype(x.dtype)
    kept = chunks.kept
    wide = opts.backend.widened_products(x.dtype)
    xk = x if kept is None else x.index_select(0, kept)
    tk = target if kept is None else target.index_select(0, kept)
    dw = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    # logits, then their gradient, transposed; float32 slices as large as d(weight)'s blocks
    lt = _logits_t(dw, xk, w, b, wide, DW_BLOCK_BYTES)
    be = opts.backend
    loss_k = be.cross_entropy_columns(lt, tk, weight, opts.rows, scale, chunks.size)
    dx = db = None
    if need[0]:
        dxk = _grad_input_t(lt, w, wide)
        dx = dxk if kept is None else torch.zeros_like(x).index_copy_(0, kept, dxk)
        del dxk
    if need[2] and b is not None:
        db = lt.sum(1, dtype=_wide(b.dtype)).to(b.dtype)
    xw = xk.float() if wide else xk
    step = max(1, DW_BLOCK_BYTES // max(1, d * xw.element_size()))
    block = torch.empty((min(step, v), d), dtype=xw.dtype, device=dw.device)
    for hi in range(v, 0, -step):
        lo = max(0, hi - step)
        out = block[: hi - lo]
        torch.mm(lt[lo:hi].float() if wide else lt[lo:hi], xw, out=out)
        dw[lo:hi].copy_(out)
    del block
    loss = (
        loss_k
        if kept is None
        else torch.zeros(n, dtype=acc, device=x.device).index_copy_(0, kept, loss_k)
    )
    return loss, (dx, dw, db)


def _grad_input_t(gt: Tensor, w: Tensor, wide: bool) -> Tensor:
    """``gt.T @ w`` for ``gt`` the logits' gradient transposed ``(V, n)``; when ``wide``, summed
    in float32 slice by slice of W's rows (each slice's product adds to the float32 sum, so the
    slices are large: :data:`DW_BLOCK_BYTES`) and rounded once."""
    if not wide:
        return torch.mm(gt.t(), w)
    n = gt.shape[1]
    dxf = torch.zeros((n, w.shape[1]), dtype=torch.float32, device=w.device)
    for lo, hi in _slices(w.shape[0], max(n, w.shape[1]), DW_BLOCK_BYTES):
        dxf.addmm_(gt[lo:hi].float().t(), w[lo:hi].float())
    return dxf.to(w.dtype)


class LinearCrossEntropy(torch.autograd.Function):
    """``(N, D)`` input, ``(V, D)`` weight, ``(V,)`` bias or None, ``(N,)`` class indices or
    ``(N, V)`` probabilities; returns the reduced loss (or ``(N,)`` losses)."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        w: Tensor,
        b: Tensor | None,
        target: Tensor,
        weight: Tensor | None,
        opts: LinearOptions,
    ) -> Tensor:
        need = tuple(
            bool(n) and opts.grad_enabled
            for n in ctx.needs_input_grad[:3]  # type: ignore[attr-defined]
        )
        need = (need[0], need[1], need[2] and b is not None)
        ctx.opts = opts  # type: ignore[attr-defined]
        ctx.need = need  # type: ignore[attr-defined]
        ctx.inputs = Inputs(x, w, b, target, weight)  # type: ignore[attr-defined]
        loss, grads = linear_forward(x, w, b, target, weight, opts, need)
        if opts.reduction == "none":
            ctx.save_for_backward(x, w, b, target, weight)  # type: ignore[arg-type]
        else:
            ctx.save_for_backward(*grads)  # type: ignore[arg-type]
        return loss

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        opts: LinearOptions = ctx.opts
        none = opts.reduction == "none"
        if torch.is_grad_enabled() or (none and batched(g)):
            grads = composite_grads(ctx.inputs.unpack(), g, opts, ctx.needs_input_grad)
            return (*grads, None)
        Inputs.release(ctx)
        if none:
            x, w, b, target, weight = ctx.saved_tensors
            dx, dw, db = linear_none_grads(x, w, b, target, weight, g, opts, ctx.need)
        elif batched(g):
            dx, dw, db = (None if t is None else scale(t, g) for t in ctx.saved_tensors)
        else:
            # the saved gradients scaled in place when the graph is freed (no second
            # d(weight)-sized buffer), copies when it is kept
            dx, dw, db = (
                None if t is None else scale_saved(t, g, backend=opts.backend)
                for t in ctx.saved_tensors
            )
        return dx, dw, db, None, None, None


def linear_forward(
    x: Tensor, w: Tensor, b: Tensor | None, target: Tensor, weight: Tensor | None,
    opts: LinearOptions, need: tuple[bool, bool, bool],
) -> tuple[Tensor, Grads]:  # fmt: skip
    """The loss (reduced, in ``opts.out_dtype``) and, unless ``reduction='none'``, the
    ``need``-ed gradients of input, weight and bias, already scaled for the reduction."""
    prob = target.dim() == 2
    n = x.shape[0]
    acc = acc_dtype(x.dtype)
    denom: Tensor | float | None = None
    scale = None
    if opts.reduction == "mean":
        if prob:
            denom = float(n) if n else float("nan")
            scale = torch.tensor(1.0 / n if n else float("inf"), dtype=torch.float64)
        else:
            d = mean_denominator(target, weight, opts.rows.ignore_index)
            scale = torch.where(d == 0, torch.nan, 1.0 / d).to(acc)
            denom = torch.where(d == 0, torch.nan, d)
    elif opts.reduction == "sum" and opts.divisor is not None:
        div = opts.divisor.to(x.device)
        scale = (1.0 / div).to(acc)
    out_dtype = x.dtype if opts.out_dtype is None else opts.out_dtype
    if opts.reduction == "none":
        loss, _ = _run(x, w, b, target, weight, opts, None, None, (False,) * 3)
        return loss.to(out_dtype), (None, None, None)
    loss, grads = _run(x, w, b, target, weight, opts, scale, None, need)
    total = reduce_rows(loss, opts.reduction, denom)
    if opts.reduction == "sum" and opts.divisor is not None:
        total = total / div
    return total.to(out_dtype), grads


def linear_none_grads(
    x: Tensor, w: Tensor, b: Tensor | None, target: Tensor, weight: Tensor | None, g: Tensor,
    opts: LinearOptions, need: tuple[bool, bool, bool],
) -> Grads:  # fmt: skip
    """``reduction='none'``: the gradients for the per-row incoming gradient ``g``, the
    chunks' logits computed again."""
    return _run(x, w, b, target, weight, opts, None, g.to(acc_dtype(x.dtype)), need)[1]


def composite(
    x: Tensor, w: Tensor, b: Tensor | None, target: Tensor, weight: Tensor | None,
    opts: LinearOptions,
) -> Tensor:  # fmt: skip
    """The loss by torch's own operations, with the logits materialised."""
    cd = opts.compute_dtype
    xc, wc, bc = (x, w, b) if cd is None else (x.to(cd), w.to(cd), None if b is None else b.to(cd))
    logits = torch.nn.functional.linear(xc, wc, bc)
    out_dtype = x.dtype if opts.out_dtype is None else opts.out_dtype
    # the cross entropy reads the logits widened to the loss's dtype, as the kernels do
    logits = logits.to(out_dtype)
    prob = target.dim() == 2
    loss = _composite.cross_entropy(logits, target, weight, opts.rows, opts.reduction, prob)
    if opts.divisor is not None:
        loss = loss / opts.divisor.to(loss.device)
    return loss.to(out_dtype)


def composite_grads(
    inputs: tuple[Tensor | None, ...], g: Tensor, opts: LinearOptions, needs: Any
) -> tuple[Tensor | None, ...]:
    """Gradients of (x, w, b, target, weight) by torch's own operations: differentiable
    (create_graph) and batchable."""
    wanted = tuple(bool(n) for n in needs[:5])
    loss, leaves = _composite.replay(
        lambda x, w, b, t, cw: composite(x, w, b, t, cw, opts), inputs, wanted
    )
    return _composite.gradients(loss, leaves, g, wanted)


# ---- token statistics of a linear head -------------------------------------------------------


def chunk_buffer(x: Tensor, w: Tensor, rows: int) -> Tensor:
    """Storage for the logits of one chunk of at most ``rows`` rows of ``x`` (x's dtype), for
    :func:`logits_into`."""
    return torch.empty((min(rows, max(x.shape[0], 1)), w.shape[0]), dtype=x.dtype, device=x.device)


def linear_stats_forward(
    h: Tensor, w: Tensor, b: Tensor | None, target: Tensor, opts: StatsOptions
) -> tuple[Tensor, ...]:
    """Token statistics of the logits ``h @ w.T + b`` of ``(M, D)`` hidden states, in the
    accumulation dtype, formed a chunk of rows at a time."""
    m = h.shape[0]
    acc = acc_dtype(h.dtype)
    out = [torch.empty(m, dtype=acc, device=h.device) for _ in range(3)]
    out.append(torch.empty(m, dtype=torch.int64, device=h.device))
    buf = chunk_buffer(h, w, opts.chunk_rows)
    for lo in range(0, m, opts.chunk_rows):
        hi = min(m, lo + opts.chunk_rows)
        logits = logits_into(buf, h[lo:hi], w, b)
        stats = opts.backend.token_stats_forward(logits, target[lo:hi], opts.rows, hi - lo)
        for o, s in zip(out, stats, strict=True):
            o[lo:hi] = s
    return tuple(out)


def linear_stats_grads(
    h: Tensor, w: Tensor, b: Tensor | None, target: Tensor, g_lp: Tensor, g_h: Tensor,
    opts: StatsOptions, need: tuple[bool, bool, bool],
) -> Grads:  # fmt: skip
    """Gradients of the hidden states, weight and bias (those in ``need``) for incoming
    gradients of logprob and entropy; each chunk's logits computed again and turned into their
    gradient in place."""
    acc = acc_dtype(h.dtype)
    g_lp, g_h = g_lp.to(acc), g_h.to(acc)
    chunks = -(-h.shape[0] // opts.chunk_rows)
    grads = param_grads(h, w, b, need, opts.backend, chunks)
    buf = chunk_buffer(h, w, opts.chunk_rows)
    for lo in range(0, h.shape[0], opts.chunk_rows):
        hi = min(h.shape[0], lo + opts.chunk_rows)
        logits = logits_into(buf, h[lo:hi], w, b)
        opts.backend.token_stats_backward(
            logits, target[lo:hi], opts.rows, g_lp[lo:hi], g_h[lo:hi], logits, hi - lo
        )
        add_chunk_grads(grads, logits, h[lo:hi], w, slice(lo, hi), opts.backend)
    del buf
    return final_grads(grads, w, b)


class LinearTokenStatsFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        h: Tensor,
        w: Tensor,
        b: Tensor | None,
        target: Tensor,
        opts: StatsOptions,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        stats = linear_stats_forward(h, w, b, target, opts)
        ctx.save_for_backward(h, w, b, target)  # type: ignore[arg-type]
        ctx.opts = opts  # type: ignore[attr-defined]
        return stats_outputs(ctx, stats, h.dtype)

    @staticmethod
    def backward(ctx: Any, g_lp: Tensor, g_h: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        h, w, b, target = ctx.saved_tensors
        opts: StatsOptions = ctx.opts
        need = tuple(bool(n) for n in ctx.needs_input_grad[:3])
        if differentiable_backward(g_lp, g_h):
            inputs, wanted = (h, w, b, target), (*need, False)
            grads = _composite.token_stats_grads(inputs, (g_lp, g_h), opts.rows, wanted)
            return (*grads, None)
        return (*linear_stats_grads(h, w, b, target, g_lp, g_h, opts, need), None, None)  # type: ignore[arg-type]
