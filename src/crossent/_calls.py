"""Which path a cross-entropy call takes, written once for :mod:`crossent.functional` and
:mod:`crossent.distributed`: under a torch.func transform or forward-mode AD, torch's own
operations (:mod:`crossent._composite`); under torch.compile, the custom operators
(:mod:`crossent._ops`); otherwise the autograd Functions (:mod:`crossent._autograd`), the
gradient written over the logits when ``inplace_backward`` asks for it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _composite, _ops
from ._args import check_inplace, effective_smoothing, index_rows
from ._autograd import (
    CrossEntropyIndex,
    CrossEntropyProb,
    LossOfGrad,
    LossOptions,
    WriteGrad,
    in_place,
)
from ._transforms import compiling, composed
from .backends.base import Backend, RowOptions
from .dispatch import resolve


def cross_entropy_loss(
    x: Tensor, target: Tensor, weight: Tensor | None, opts: LossOptions, prob: bool
) -> Tensor:
    """Cross entropy of ``(M, V)`` rows through autograd: class indices ``(M,)``, or
    probabilities ``(M, V)`` when ``prob``. With ``opts.inplace`` (arguments checked by the
    caller) the gradient is written over ``x``."""
    if composed(x, target, weight):  # a torch.func transform, or forward-mode AD
        if opts.backend.distributed:  # torch's operations would see this rank's slice only
            raise NotImplementedError(
                "crossent: vocabulary-parallel cross entropy cannot run under torch.func "
                "transforms (vmap, grad, jacrev, jvp) or forward-mode AD"
            )
        return _composite.cross_entropy(x, target, weight, opts.rows, opts.reduction, prob)
    if compiling():  # the same computation, as custom operators (in place or not)
        return _ops.cross_entropy(x, target, weight, opts, prob)
    if in_place(x, opts):
        out: list[Tensor] = []
        dirty = WriteGrad.apply(x, target, weight, opts, prob, out)
        return LossOfGrad.apply(dirty, out, opts.reduction == "none")
    function = CrossEntropyProb if prob else CrossEntropyIndex
    return function.apply(x, target, weight, opts)


def index_cross_entropy(
    input: Tensor, target: Tensor, weight: Tensor | None, red: str, ii: int, ls: float,
    extensions: tuple[float, float | None, float], inplace: bool, backend: str | Backend,
    classes: int | None = None,
) -> Tensor:  # fmt: skip
    """Class-index cross entropy of checked arguments: flatten to rows (targets and weights
    index ``classes`` classes, the input's class dim by default), then the autograd Function
    on ``backend`` (a name, resolved for ``input``, or a backend object)."""
    rows = index_rows(input, target, weight, ii, "nll_loss", classes)
    if inplace:  # arguments checked, nothing written yet
        check_inplace(input, target, weight)
    zl, cap, temp = extensions
    row_opts = RowOptions(
        ignore_index=ii, label_smoothing=effective_smoothing(ls), z_loss=zl, softcap=cap,
        temperature=temp,
    )
    be = resolve(backend, input) if isinstance(backend, str) else backend
    opts = LossOptions(be, row_opts, red, torch.is_grad_enabled(), inplace)
    loss = cross_entropy_loss(rows.x, rows.target, rows.weight, opts, prob=False)
    return loss.view(rows.out_shape) if red == "none" else loss
