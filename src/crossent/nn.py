"""Modules with torch.nn's constructor arguments, computed by crossent.

Each subclasses its torch counterpart: construction, the ``weight`` buffer, ``state_dict``,
``repr``, ``__constants__`` and attribute mutation behave exactly as torch's, and
``isinstance(m, torch.nn.CrossEntropyLoss)`` holds. Only ``forward`` changes. Attributes are
read at every forward, as in torch. torch builds before 2.13 have no
``torch.nn.LinearCrossEntropyLoss``; there :class:`LinearCrossEntropyLoss` builds on a module
with the same constructor, checks, attributes and ``repr``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import _docs, functional
from .dispatch import BackendName

__all__ = ["CrossEntropyLoss", "NLLLoss", "LogSoftmax", "Softmax", "LinearCrossEntropyLoss"]


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    def __init__(
        self,
        weight: Tensor | None = None,
        size_average: Any = None,
        ignore_index: int = -100,
        reduce: Any = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        backend: BackendName = "auto",
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return functional.cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            backend=self.backend,
        )


class NLLLoss(torch.nn.NLLLoss):
    def __init__(
        self,
        weight: Tensor | None = None,
        size_average: Any = None,
        ignore_index: int = -100,
        reduce: Any = None,
        reduction: str = "mean",
        *,
        backend: BackendName = "auto",
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction)
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return functional.nll_loss(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            backend=self.backend,
        )


class Softmax(torch.nn.Softmax):
    def __init__(self, dim: int | None = None, *, backend: BackendName = "auto") -> None:
        super().__init__(dim)
        self.backend = backend

    def forward(self, input: Tensor) -> Tensor:
        return functional.softmax(input, self.dim, _stacklevel=5, backend=self.backend)


class LogSoftmax(torch.nn.LogSoftmax):
    def __init__(self, dim: int | None = None, *, backend: BackendName = "auto") -> None:
        super().__init__(dim)
        self.backend = backend

    def forward(self, input: Tensor) -> Tensor:
        return functional.log_softmax(input, self.dim, _stacklevel=5, backend=self.backend)


class _LinearCrossEntropyModule(torch.nn.modules.loss._WeightedLoss):
    """What ``torch.nn.LinearCrossEntropyLoss`` (torch 2.13) holds: the classifier as a
    ``Linear`` of ``in_features`` to ``num_classes·prod(out_features)`` outputs, the class
    ``weight`` buffer and the loss options. For torch builds that have no such module."""

    __constants__ = ["num_classes", "out_features", "reduction", "ignore_index", "label_smoothing"]

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple[int, ...] = (),
        bias: bool = False,
        device: Any = None,
        dtype: Any = None,
        reduction: str = "mean",
        weight: Tensor | None = None,
        ignore_index: int | None = None,
        label_smoothing: float = 0.0,
        options: Any = None,
    ) -> None:
        if weight is not None and weight.shape != (num_classes,):
            raise RuntimeError(
                f"expected weight shape to be {(num_classes,)}, got {tuple(weight.shape)}"
            )
        if not 0.0 <= label_smoothing <= 1.0:
            raise RuntimeError(
                f"expected label_smoothing to be in range [0, 1], got {label_smoothing}"
            )
        super().__init__(weight=weight, reduction=reduction)
        self.num_classes = num_classes
        self.out_features = out_features
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        # a 2-D Linear; forward views its weight as (num_classes, *out_features, in_features)
        outputs = math.prod(out_features, start=num_classes)
        self.linear = torch.nn.Linear(in_features, outputs, bias=bias, device=device, dtype=dtype)
        self.options = options

    def extra_repr(self) -> str:
        return (
            f"in_features={self.linear.in_features}, num_classes={self.num_classes},"
            f" out_features={self.out_features}, bias={self.linear.bias is not None},"
            f" reduction={self.reduction}, ignore_index={self.ignore_index},"
            f" label_smoothing={self.label_smoothing}, options={self.options}"
        )


_LinearCrossEntropyBase: type = getattr(
    torch.nn, "LinearCrossEntropyLoss", _LinearCrossEntropyModule
)


class LinearCrossEntropyLoss(_LinearCrossEntropyBase):
    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple[int, ...] = (),
        bias: bool = False,
        device: Any = None,
        dtype: Any = None,
        reduction: str = "mean",
        weight: Tensor | None = None,
        ignore_index: int | None = None,
        label_smoothing: float = 0.0,
        options: Any = None,
        backend: BackendName = "auto",
        chunk_bytes: int | None = None,
    ) -> None:
        super().__init__(
            in_features,
            num_classes,
            out_features=out_features,
            bias=bias,
            device=device,
            dtype=dtype,
            reduction=reduction,
            weight=weight,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            options=options,
        )
        self.backend = backend
        self.chunk_bytes = chunk_bytes

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        linear_weight = self.linear.weight.reshape(
            (self.num_classes, *self.out_features, self.linear.in_features)
        )
        bias = self.linear.bias
        linear_bias = None if bias is None else bias.reshape((self.num_classes, *self.out_features))
        return functional.linear_cross_entropy(
            input,
            linear_weight,
            target,
            linear_bias=linear_bias,
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            options=self.options,
            backend=self.backend,
            chunk_bytes=self.chunk_bytes,
        )


def _module_doc(cls: type, torch_cls: type, fn: str) -> str:
    head = f"Drop-in :class:`torch.nn.{torch_cls.__name__}` computed by :func:`crossent.{fn}`."
    head += "\n\n    "
    return head + _docs.MODULE_BACKEND_NOTE.format(fn=fn) + "\n    " + (torch_cls.__doc__ or "")


CrossEntropyLoss.__doc__ = _module_doc(CrossEntropyLoss, torch.nn.CrossEntropyLoss, "cross_entropy")
NLLLoss.__doc__ = _module_doc(NLLLoss, torch.nn.NLLLoss, "nll_loss")
Softmax.__doc__ = _module_doc(Softmax, torch.nn.Softmax, "softmax")
LogSoftmax.__doc__ = _module_doc(LogSoftmax, torch.nn.LogSoftmax, "log_softmax")
LinearCrossEntropyLoss.__doc__ = (
    "Drop-in :class:`torch.nn.LinearCrossEntropyLoss` computed by "
    ":func:`crossent.linear_cross_entropy`.\n\n    "
    + _docs.LINEAR_MODULE_NOTE
    + "\n    "
    + (_LinearCrossEntropyBase.__doc__ or "")
)
