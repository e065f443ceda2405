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

import torch
import torch.distributed as dist
from torch import Tensor

from . import _args
from ._autograd import LossOptions, cross_entropy_loss
from .backends.base import RowOptions
from .backends.vocab_parallel import VocabParallelBackend
from .dispatch import BackendName, resolve
from .functional import _check_index_input, _index_cross_entropy, _loss_arguments

__all__ = ["shard_offsets", "vocab_parallel_cross_entropy"]


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
    red, ii, ls, (zl, cap, temp) = _loss_arguments(
        fn, input, target, weight, size_average, ignore_index, reduce, reduction,
        label_smoothing, z_loss, softcap, temperature,
    )  # fmt: skip
    _require_group(group)
    here = input.shape[0] if input.dim() == 1 else input.shape[1]
    if (vocab_start is None) != (vocab_size is None):
        raise ValueError(f"{fn}: pass both vocab_start and vocab_size, or neither")
    if vocab_start is None or vocab_size is None:
        start, total = shard_offsets(here, group, input.device)
    else:
        start, total = _check_slice(vocab_start, vocab_size, here)
    local = resolve(backend, input)
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
        be = VocabParallelBackend(group, start, total, local)
        opts = LossOptions(be, row_opts, red, torch.is_grad_enabled(), inplace_backward)
        loss = cross_entropy_loss(prob.x, prob.target, weight, opts, prob=True)
        return loss.view(prob.out_shape) if red == "none" else loss
    _check_index_input(input, ls)
    return _index_cross_entropy(
        input, target, weight, red, ii, ls, (zl, cap, temp), inplace_backward,
        VocabParallelBackend(group, start, total, local), classes=total,
    )  # fmt: skip


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
