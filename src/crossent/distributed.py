"""Vocabulary-parallel cross entropy over ``torch.distributed``.

In tensor-parallel language models the classifier's rows are split across the ranks of a group,
so each rank computes the logits of its own slice of the vocabulary. Gathering them to call
:func:`crossent.cross_entropy` would put all ``N×V`` logits, and their gradient, on every rank.
:func:`vocab_parallel_cross_entropy` takes each rank's slice as it is and returns, on every
rank, the loss that :func:`torch.nn.functional.cross_entropy` gives on the logits concatenated
along the class dim in rank order; the gradient each rank receives is that of its own slice.
Per call it exchanges one packed ``(5, N)`` float64 tensor of per-row statistics (one
all-gather), whatever the vocabulary size: the method is in
:mod:`crossent.backends.vocab_parallel`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import _args, dispatch
from ._autograd import (
    LossOptions,
    mean_denominator,
    reduce_rows,
)
from ._calls import cross_entropy_loss, index_cross_entropy
from ._linear import add_chunk_grads, chunk_buffer, final_grads, logits_into, param_grads
from .backends.base import INDEX_PARTS, Merged, RowOptions, acc_dtype, merge_index
from .backends.vocab_parallel import VocabParallelBackend
from .dispatch import BackendName

__all__ = [
    "shard_offsets",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
]


def _require_group(group: dist.ProcessGroup | None) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "vocab_parallel_cross_entropy needs an initialised torch.distributed process "
            "group (call torch.distributed.init_process_group first)"
        )


def shard_offsets(classes_here: int, group: dist.ProcessGroup | None = None,
                  device: torch.device | str = "cpu") -> tuple[int, int]:  # fmt: skip
    """``(start, total)``: where this rank's ``classes_here`` classes begin in the whole
    vocabulary, and its size, the ranks' slices being consecutive in rank order (one
    all-gather of one integer per rank, on ``device``)."""
    _require_group(group)
    if classes_here < 0:
        raise ValueError(f"classes_here must be >= 0, got {classes_here}")
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([classes_here], dtype=torch.int64, device=device),
                    group=group)  # fmt: skip
    counts = [int(t) for t in sizes]
    rank = dist.get_rank(group)
    return sum(counts[:rank]), sum(counts)


def vocab_parallel_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    backend: BackendName = "auto",
    inplace_backward: bool = False,
    z_loss: float = 0.0,
    softcap: float | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Cross entropy of logits whose class dim is split across the ranks of ``group``.

    ``input``: this rank's slice of the logits, shaped as for :func:`crossent.cross_entropy`
    (``(C_r,)``, ``(N, C_r)`` or ``(N, C_r, d1, ..., dk)``), the slices consecutive in rank
    order (rank 0 holds the first classes; slices may differ in size, and may be empty).
    ``target``: class indices into the whole vocabulary, the same on every rank; or class
    probabilities, this rank's slice of them (``input``'s shape). ``weight``: all ``C`` class
    weights, the same on every rank. Every other argument is that of
    :func:`crossent.cross_entropy`, which this equals on the concatenated logits: the same loss
    on every rank (bit for bit), and on each rank the gradient of its own slice.

    ``vocab_start`` and ``vocab_size``: where this rank's classes begin in the whole vocabulary
    and its size, when the caller knows them (as a tensor-parallel layer does); otherwise the
    ranks exchange their slice sizes first (one all-gather of one integer per rank, read back
    to the host). The rank-local work runs on ``backend`` (chosen for ``input`` as in
    :func:`crossent.cross_entropy`), and the ranks exchange their per-row statistics in one
    all-gather of ``5 × N`` float64 values (4 for probability targets) per call, whatever the
    vocabulary size; every rank of ``group`` must call it with the same number of rows and the
    same targets (class indices), weights and options.
    """
    fn = "vocab_parallel_cross_entropy"
    red, ii, ls, (zl, cap, temp) = _args.loss_arguments(
        fn, input, target, weight, size_average, ignore_index, reduce, reduction,
        label_smoothing, z_loss, softcap, temperature,
    )  # fmt: skip
    _require_group(group)
    here = input.shape[0] if input.dim() == 1 else input.shape[1]
    start, total = _slice(fn, here, vocab_start, vocab_size, group, input.device)
    vp = dispatch.vocab_parallel(backend, input, group, start, total)
    if target.is_floating_point() and input.shape == target.shape:
        if torch.is_grad_enabled() and (
            target.requires_grad or (weight is not None and weight.requires_grad)
        ):
            raise NotImplementedError(
                f"{fn}: gradients of probability targets or of the class weights are not "
                "computed across a vocabulary split; detach them"
            )
        prob = _args.prob_rows(input, target, weight, ii, ls, classes=total)
        if inplace_backward:
            _args.check_inplace(input, target, weight)
        row_opts = RowOptions(
            label_smoothing=_args.effective_smoothing(ls), z_loss=zl, softcap=cap,
            temperature=temp,
        )
        opts = LossOptions(vp, row_opts, red, torch.is_grad_enabled(), inplace_backward)
        loss = cross_entropy_loss(prob.x, prob.target, weight, opts, prob=True)
        return loss.view(prob.out_shape) if red == "none" else loss
    _args.check_index_input(input, ls)
    return index_cross_entropy(
        input, target, weight, red, ii, ls, (zl, cap, temp), inplace_backward,
        vp, classes=total,
    )  # fmt: skip


def _slice(
    fn: str, here: int, vocab_start: int | None, vocab_size: int | None,
    group: dist.ProcessGroup | None, device: torch.device,
) -> tuple[int, int]:  # fmt: skip
    """``(start, total)`` of this rank's ``here`` classes: as given, checked, or exchanged."""
    if (vocab_start is None) != (vocab_size is None):
        raise ValueError(f"{fn}: pass both vocab_start and vocab_size, or neither")
    if vocab_start is None or vocab_size is None:
        return shard_offsets(here, group, device)
    return _check_slice(vocab_start, vocab_size, here)


def _check_slice(vocab_start: int, vocab_size: int, here: int) -> tuple[int, int]:
    for name, value in (("vocab_start", vocab_start), ("vocab_size", vocab_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if vocab_start < 0 or vocab_start + here > vocab_size:
        raise ValueError(
            f"this rank's {here} classes from vocab_start={vocab_start} do not fit in "
            f"vocab_size={vocab_size}"
        )
    return vocab_start, vocab_size


# ---- the language-model head split over the vocabulary --------------------------------------

LINEAR_CHUNK_BYTES = 32 * 2**20  # logits of one chunk of rows, at most


class _VocabParallelLinear(torch.autograd.Function):
    """Cross entropy of ``x @ w.T + b`` over a slice of the classes, on the chunked path of
    :func:`crossent.linear_cross_entropy`: each chunk's logits, in the input's dtype, go into
    one reused buffer. The forward pass takes each chunk's partial statistics (one all-gather of
    all of them, merged in rank order on every rank); the backward pass computes each chunk's
    logits again, turns them in place into their gradient from the merged statistics, and adds
    the chunk's share of d x (in float32 for 16-bit inputs, summed over the group, rounded
    once) and of d w, d b (float32 accumulators for 16-bit parameters)."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, w: Tensor, b: Tensor | None, target: Tensor, weight: Tensor | None,
        opts: RowOptions, reduction: str, vp: VocabParallelBackend, rows: int,
    ) -> Tensor:  # fmt: skip
        n = x.shape[0]
        parts = torch.empty(INDEX_PARTS, n, dtype=torch.float64, device=x.device)
        buf = chunk_buffer(x, w, rows)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            logits = logits_into(buf, x[r0:r1], w, b)
            parts[:, r0:r1] = vp.local.cross_entropy_partial(
                logits, target[r0:r1], weight, opts, vp.start, vp.total
            )
        del buf
        merged = merge_index(vp.gather(parts), target, weight, opts, vp.total)
        denom = None
        if reduction == "mean":
            denom = mean_denominator(target, weight, opts.ignore_index)
        loss = reduce_rows(merged.loss, reduction, denom).to(x.dtype)
        ctx.save_for_backward(x, w, b, target, weight, *merged)
        ctx.rest = (opts, reduction, vp, rows, denom)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, w, b, target, weight, loss, lse, coef = ctx.saved_tensors
        opts, reduction, vp, rows, denom = ctx.rest
        n = x.shape[0]
        if reduction == "none":
            scale = g.to(torch.float64).reshape(n)
        else:
            s = g.to(torch.float64).reshape(())
            scale = (s if denom is None else s / denom).expand(n)
        need = tuple(bool(k) for k in ctx.needs_input_grad[:3])
        chunks = -(-n // rows)
        _, dw, db = param_grads(x, w, b, (False, need[1], need[2]), vp.local, chunks)
        dx = torch.zeros(x.shape, dtype=acc_dtype(x.dtype), device=x.device)
        buf = chunk_buffer(x, w, rows)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            logits = logits_into(buf, x[r0:r1], w, b)
            part = Merged(loss[r0:r1], lse[r0:r1], coef[r0:r1])
            vp.local.cross_entropy_partial_grad(
                logits, target[r0:r1], weight, opts, vp.start, vp.total, part, logits,
                scale[r0:r1],
            )  # logits: now their gradient
            add_chunk_grads((None, dw, db), logits, x[r0:r1], w, slice(r0, r1), vp.local)
            if dx.dtype == x.dtype:
                torch.mm(logits, w, out=dx[r0:r1])
            else:
                dx[r0:r1] = torch.mm(logits, w)
        del buf
        if dist.get_world_size(vp.group) > 1:
            dist.all_reduce(dx, group=vp.group)
        _, dw, db = final_grads((None, dw, db), w, b)
        return (dx.to(x.dtype), dw, db, None, None, None, None, None, None)


def vocab_parallel_linear_cross_entropy(
    input: Tensor,
    weight_shard: Tensor,
    target: Tensor,
    *,
    bias_shard: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    backend: BackendName = "auto",
    z_loss: float = 0.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    chunk_bytes: int | None = None,
) -> Tensor:
    """Cross entropy of a language-model head whose vocabulary is split across the ranks of
    ``group``: the loss of ``cross_entropy(input @ W.T + bias, target, ...)`` with ``W`` the
    ranks' ``weight_shard`` rows concatenated in rank order, the same on every rank.

    ``input``: ``(N, D)`` (or ``(B, T, D)``, targets ``(B, T)``) hidden states, the same on
    every rank (replicated); ``weight_shard``: this rank's ``(V_r, D)`` rows of the head (may
    be empty), ``bias_shard`` its ``(V_r,)`` bias; ``target``: class indices into the whole
    vocabulary, the same on every rank; ``weight``: all ``V`` class weights, the same on every
    rank. The logits are computed a chunk of rows at a time in the input's dtype, as in
    :func:`crossent.linear_cross_entropy` (at most ``chunk_bytes`` of them, 32 MiB by
    default), so not even this rank's ``N × V_r`` logits exist at once; the
    forward pass exchanges one all-gather of ``5 × N`` float64 statistics, the backward pass
    computes each chunk's logits again and sums d(input) over the group (one all-reduce of
    ``N × D``, float32 for 16-bit inputs). d(weight_shard) and d(bias_shard) are this
    rank's, accumulated in float32 for 16-bit parameters. ``input``, ``weight_shard`` and
    ``bias_shard`` have one dtype (torch's linear layer's errors otherwise).
    ``vocab_start``/``vocab_size`` as in :func:`vocab_parallel_cross_entropy`; the other
    options are those of :func:`crossent.linear_cross_entropy`.
    """
    fn = "vocab_parallel_linear_cross_entropy"
    _require_group(group)
    if input.dim() not in (2, 3) or weight_shard.dim() != 2:
        raise ValueError(
            f"{fn}: input must be (N, D) or (B, T, D) and weight_shard (V_r, D), got "
            f"{tuple(input.shape)} and {tuple(weight_shard.shape)}"
        )
    if input.shape[-1] != weight_shard.shape[1]:
        raise ValueError(
            f"{fn}: input's last dim {input.shape[-1]} does not match weight_shard's "
            f"{weight_shard.shape[1]}"
        )
    if bias_shard is not None and tuple(bias_shard.shape) != (weight_shard.shape[0],):
        raise ValueError(f"{fn}: bias_shard must be ({weight_shard.shape[0]},)")
    _args.check_linear_dtypes(input, weight_shard, bias_shard)
    if target.shape != input.shape[:-1]:
        raise ValueError(
            f"{fn}: target must have shape {tuple(input.shape[:-1])}, got {tuple(target.shape)}"
        )
    if target.is_floating_point():
        raise TypeError(f"{fn} takes class-index targets, got a {target.dtype} target")
    red = _args.reduction_string(None, None, reduction)
    _args.check_label_smoothing(label_smoothing)
    zl, cap, temp = _args.check_extensions(z_loss, softcap, temperature)
    here = weight_shard.shape[0]
    start, total = _slice(fn, here, vocab_start, vocab_size, group, input.device)
    if weight is not None and (weight.dim() != 1 or weight.numel() != total):
        raise RuntimeError(
            f"{fn}: weight tensor should be defined either for all {total} classes or no "
            f"classes but got weight tensor of shape: {tuple(weight.shape)}"
        )
    x = input.reshape(-1, input.shape[-1])
    t = target.reshape(-1)
    if t.dtype != torch.int64:
        t = t.long()
    _args.check_target_range(t, total, ignore_index)
    opts = RowOptions(
        ignore_index=ignore_index, label_smoothing=_args.effective_smoothing(label_smoothing),
        z_loss=zl, softcap=cap, temperature=temp,
    )
    budget = LINEAR_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    rows = max(1, budget // (input.element_size() * max(here, 1)))
    vp = dispatch.vocab_parallel(backend, x, group, start, total)
    loss = _VocabParallelLinear.apply(
        x, weight_shard, bias_shard, t, weight, opts, red, vp, rows
    )
    return loss.view(target.shape) if red == "none" else loss


# ---- DTensor logits -----------------------------------------------------------------------------


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (without importing it)."""
    return type(t).__name__ == "DTensor" and hasattr(t, "device_mesh")


def dtensor_cross_entropy(
    input: Any, target: Any, weight: Any, size_average: bool | None, ignore_index: int,
    reduce: bool | None, reduction: str, label_smoothing: float, *,
    whole: Callable[..., Tensor], **extensions: Any,
) -> Tensor:  # fmt: skip
    """:func:`crossent.cross_entropy` of DTensor logits: sharded on the class dim of a 1-D
    device mesh (the layout of torch's ``loss_parallel()``), or replicated (computed by
    ``whole``, the cross entropy of plain tensors, on each rank's copy). The classes of each
    rank and the group come from the DTensor's metadata; the targets are replicated (a tensor
    or a replicated DTensor), or, for probabilities, sharded as the logits are or whole; the
    class weights replicated. Returns the loss as a replicated DTensor on the same mesh."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    fn = "cross_entropy"
    mesh = input.device_mesh
    if mesh.ndim != 1:
        raise NotImplementedError(
            f"{fn} of a DTensor takes a 1-D device mesh, got a {mesh.ndim}-D one"
        )
    class_dim = 0 if input.dim() == 1 else 1
    (placement,) = input.placements
    local_target = _replicated(target, fn, "target", Shard(class_dim))
    w = _replicated(weight, fn, "weight", None)
    kw = dict(
        weight=w, size_average=size_average, ignore_index=ignore_index, reduce=reduce,
        reduction=reduction, label_smoothing=label_smoothing,
    )  # fmt: skip
    if placement.is_replicate():
        loss = whole(input.to_local(), local_target, **kw, **extensions)
    elif placement == Shard(class_dim):
        local = input.to_local()
        total = input.shape[class_dim]
        world, rank = mesh.size(), mesh.get_local_rank()
        chunk = -(-total // world)
        start = min(total, rank * chunk)
        size = min(total, start + chunk) - start
        if local.shape[class_dim] != size:
            raise NotImplementedError(
                f"{fn} of a DTensor: rank {rank} holds {local.shape[class_dim]} classes where "
                f"torch.chunk's sharding gives {size}"
            )
        if local_target.is_floating_point() and tuple(local_target.shape) == tuple(input.shape):
            local_target = local_target.narrow(class_dim, start, size)  # whole probabilities
        loss = vocab_parallel_cross_entropy(
            local, local_target, **kw, group=mesh.get_group(), vocab_start=start,
            vocab_size=total, **extensions,
        )  # fmt: skip
    else:
        raise NotImplementedError(
            f"{fn} of a DTensor takes logits sharded on the class dim ({class_dim}) or "
            f"replicated, got placements {input.placements}"
        )
    return DTensor.from_local(loss, mesh, [Replicate()], run_check=False)


def _replicated(t: Any, fn: str, name: str, shard: Any) -> Any:
    """The local tensor of a replicated DTensor argument (or of one placed as ``shard``), a
    plain tensor as it is."""
    if t is None or not is_dtensor(t):
        return t
    (placement,) = t.placements
    if placement.is_replicate() or placement == shard:
        return t.to_local()
    raise NotImplementedError(
        f"{fn} of a DTensor: the {name} must be replicated, got placements {t.placements}"
    )
