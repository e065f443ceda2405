"""Vocabulary-parallel cross entropy over ``torch.distributed``.

In tensor-parallel language models the classifier's rows are split across the ranks of a group,
so each rank computes the logits of its own slice of the vocabulary. Gathering them to call
:func:`crossent.cross_entropy` would put all ``N×V`` logits, and their gradient, on every rank.
:func:`vocab_parallel_cross_entropy` takes each rank's slice as it is and returns, on every
rank, the loss that :func:`torch.nn.functional.cross_entropy` gives on the logits concatenated
along the class dim in rank order; the gradient each rank receives is that of its own slice.
Per row it exchanges two ``(N,)`` vectors (the max, then three sums), whatever the vocabulary
size: the method is in :mod:`crossent.backends.vocab_parallel`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .backends.vocab_parallel import VocabParallelBackend
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
    inplace_backward: bool = False,
    z_loss: float = 0.0,
    softcap: float | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Cross entropy of logits whose class dim is split across the ranks of ``group``.

    ``input``: this rank's slice of the logits, shaped as for :func:`crossent.cross_entropy`
    (``(C_r,)``, ``(N, C_r)`` or ``(N, C_r, d1, ..., dk)``), the slices consecutive in rank
    order (rank 0 holds the first classes; slices may differ in size, and may be empty).
    ``target``: class indices into the whole vocabulary, the same on every rank. ``weight``:
    all ``C`` class weights, the same on every rank. Every other argument is that of
    :func:`crossent.cross_entropy`, which this equals on the concatenated logits: the same
    loss on every rank, and on each rank the gradient of its own slice. Probability targets
    are not taken (they would be sliced like the logits): pass class indices.

    Every rank of ``group`` must call it with the same number of rows and the same targets,
    weights and options; it exchanges one integer per rank (the slice sizes, with a host
    synchronisation) and two ``(N,)`` vectors per call.
    """
    fn = "vocab_parallel_cross_entropy"
    red, ii, ls, extensions = _loss_arguments(
        fn, input, target, weight, size_average, ignore_index, reduce, reduction,
        label_smoothing, z_loss, softcap, temperature,
    )  # fmt: skip
    if target.is_floating_point():
        raise TypeError(
            f"{fn} takes class-index targets (int64 or uint8), got a {target.dtype} target; "
            "probability targets are not supported across a vocabulary split"
        )
    _require_group(group)
    _check_index_input(input, ls)
    here = input.shape[0] if input.dim() == 1 else input.shape[1]
    start, total = shard_offsets(here, group, input.device)
    return _index_cross_entropy(
        input, target, weight, red, ii, ls, extensions, inplace_backward,
        VocabParallelBackend(group, start, total), classes=total,
    )  # fmt: skip
