"""Argument checking and shape normalisation, written once for every backend.

Everything here mirrors torch 2.13's checks (see TORCH_SEMANTICS in the design notes): the
same exception types, in the same order, with messages that start with torch's words and then
name the offending value. Nothing in this module computes a loss.
"""

from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

_REDUCTIONS = ("none", "mean", "sum")

# torch's own spelling of dtypes in error messages (c10::toString(ScalarType)).
_DTYPE_NAMES = {
    torch.uint8: "Byte",
    torch.int8: "Char",
    torch.int16: "Short",
    torch.int32: "Int",
    torch.int64: "Long",
    torch.float16: "Half",
    torch.float32: "Float",
    torch.float64: "Double",
    torch.bfloat16: "BFloat16",
    torch.bool: "Bool",
    torch.complex32: "ComplexHalf",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def dtype_name(dtype: torch.dtype) -> str:
    """Return torch's C++ name of ``dtype`` (``Long``, ``Float``, ...)."""
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def shape_str(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


# --------------------------------------------------------------------------------------------
# scalar arguments


def reduction_string(size_average: Any, reduce: Any, reduction: Any, stacklevel: int = 3) -> str:
    """Resolve ``reduction`` the way ``torch.nn._reduction`` does.

    Legacy ``size_average``/``reduce`` override ``reduction`` when either is not ``None`` (and
    warn); ``'elementwise_mean'`` is a deprecated alias of ``'mean'``; anything else that is not
    ``'none'``, ``'mean'`` or ``'sum'`` raises ``ValueError``.
    """
    if size_average is not None or reduce is not None:
        reduction = legacy_reduction(size_average, reduce, stacklevel + 1)
    if reduction == "elementwise_mean":
        warnings.warn(
            "reduction='elementwise_mean' is deprecated. Please use reduction='mean' instead.",
            stacklevel=stacklevel,
        )
        return "mean"
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    return reduction


def legacy_reduction(size_average: Any, reduce: Any, stacklevel: int = 3) -> str:
    """Map legacy ``size_average``/``reduce`` to a reduction string, warning as torch does."""
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    if size_average and reduce:
        ret = "mean"
    elif reduce:
        ret = "sum"
    else:
        ret = "none"
    warnings.warn(
        f"size_average and reduce args will be deprecated, please use reduction='{ret}' instead.",
        stacklevel=stacklevel,
    )
    return ret


def _type_error(fn: str, name: str, position: int, expected: str, value: Any) -> TypeError:
    return TypeError(
        f"{fn}(): argument '{name}' (position {position}) must be {expected}, "
        f"not {type(value).__name__}"
    )


def check_tensor(fn: str, name: str, position: int, value: Any, optional: bool = False) -> None:
    """Raise torch's ``TypeError`` when ``value`` is not a Tensor (or ``None`` if optional)."""
    if optional and value is None:
        return
    if not isinstance(value, Tensor):
        raise _type_error(fn, name, position, "Tensor", value)


def as_int(fn: str, name: str, position: int, value: Any) -> int:
    """Convert an int-like argument (int, NumPy integer, 0-d integer tensor) to ``int``."""
    if isinstance(value, bool):
        raise _type_error(fn, name, position, "int", value)
    if isinstance(value, Tensor):
        # torch goes through Tensor.__index__: one element of an integer dtype, any shape.
        integral = not (value.dtype.is_floating_point or value.dtype.is_complex)
        if value.numel() != 1 or not integral or value.dtype == torch.bool:
            raise _type_error(fn, name, position, "int", value)
        return int(value.item())
    try:
        out = operator.index(value)
    except TypeError:
        raise _type_error(fn, name, position, "int", value) from None
    if not _INT64_MIN <= out <= _INT64_MAX:
        raise ValueError(f"Overflow when unpacking long long: {name}={out} does not fit in int64")
    return out


def as_float(fn: str, name: str, position: int, value: Any) -> float:
    """Convert a float-like argument (float, int, bool, 0-d tensor) to ``float``."""
    if isinstance(value, Tensor):
        if value.dim() != 0 or value.dtype.is_complex:
            raise _type_error(fn, name, position, "float", value)
        return float(value.item())
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(operator.index(value))
    except TypeError:
        pass
    if hasattr(value, "__float__") and not isinstance(value, (str, bytes)):
        return float(value)
    raise _type_error(fn, name, position, "float", value)


def check_label_smoothing(label_smoothing: float) -> None:
    # torch tests only `> 0.0`: zero, negatives and NaN silently mean "no smoothing".
    if label_smoothing > 1.0:
        raise RuntimeError(
            f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing:g}"
        )


def check_extensions(
    z_loss: Any, softcap: Any, temperature: Any
) -> tuple[float, float | None, float]:
    """Validate crossent's keyword-only extensions; return them as floats."""

    def number(name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(
                f"{name} must be a real number, got {type(value).__name__} ({value!r})"
            )
        return float(value)

    z = number("z_loss", z_loss)
    if not math.isfinite(z) or z < 0.0:
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    cap = None if softcap is None else number("softcap", softcap)
    if cap is not None and not (math.isfinite(cap) and cap > 0.0):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    t = number("temperature", temperature)
    if not (math.isfinite(t) and t > 0.0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return z, cap, t


def effective_smoothing(label_smoothing: float) -> float:
    """The smoothing actually applied: torch ignores values that are not ``> 0``."""
    return label_smoothing if label_smoothing > 0.0 else 0.0


def check_floating(x: Tensor, kernel: str) -> None:
    """Raise torch's ``NotImplementedError`` for integer, bool or complex logits."""
    if not x.dtype.is_floating_point:
        raise NotImplementedError(f'"{kernel}" not implemented for \'{dtype_name(x.dtype)}\'')


def softmax_kernel_name(name: str, dim: int, ndim: int) -> str:
    """torch's kernel name in dtype errors (``<name>_lastdim_kernel_impl`` or ``_kernel_impl``)."""
    last = ndim <= 1 or dim % ndim == ndim - 1
    return f"{name}_lastdim_kernel_impl" if last else f"{name}_kernel_impl"


def wrap_dim(dim: int, ndim: int) -> int:
    """Wrap a possibly negative ``dim``; torch treats a 0-d tensor as having one dim."""
    lo, hi = (-1, 0) if ndim == 0 else (-ndim, ndim - 1)
    if not lo <= dim <= hi:
        raise IndexError(
            f"Dimension out of range (expected to be in range of [{lo}, {hi}], but got {dim})"
        )
    return dim % max(ndim, 1)


# --------------------------------------------------------------------------------------------
# class-index targets


@dataclass(frozen=True)
class IndexRows:
    """A class-index problem flattened to rows.

    ``x``: ``(M, C)`` logits (a view when the class dim is already last, else a copy);
    ``target``: ``(M,)`` int64; ``weight``: ``(C,)`` or ``None`` (K-dimensional input accepts
    any weight with C elements, as torch does); ``out_shape``: the shape of the unreduced loss.
    """

    x: Tensor
    target: Tensor
    weight: Tensor | None
    out_shape: tuple[int, ...]


def index_rows(
    x: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    grad_fn_name: str,
    classes: int | None = None,
) -> IndexRows:
    """Check a class-index problem as torch's ``nll_loss_nd`` does, then flatten it.

    ``x`` is ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``; the class dim is 0 for 1-D input
    and 1 otherwise. ``grad_fn_name`` is the prefix of torch's autograd function name used in
    the "weight cannot require grad" message (``nll_loss``). ``classes``: how many classes the
    targets and the weight index when ``x`` holds only some of them (a vocabulary shard);
    ``x``'s class dim by default.
    """
    ndim = x.dim()
    if ndim < 1:
        raise ValueError(f"Expected 1 or more dimensions (got {ndim})")
    if ndim != 1:
        tbatch = target.shape[0] if target.dim() > 0 else 0
        if x.shape[0] != tbatch:
            raise ValueError(
                f"Expected input batch_size ({x.shape[0]}) to match target batch_size "
                f"({tbatch})."
            )
    spatial = ndim >= 3
    fn = f"{grad_fn_name}2d_forward" if spatial else f"{grad_fn_name}_forward"
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"The function '{fn}' is not differentiable with respect to argument 'weight'. "
            "This input cannot have requires_grad True."
        )
    c_here = x.shape[0] if ndim == 1 else x.shape[1]
    C = c_here if classes is None else classes

    if not spatial:
        if target.dim() > 1:
            raise RuntimeError(
                "0D or 1D target tensor expected, multi-target not supported "
                f"(got target of shape {shape_str(target)})"
            )
        _check_target_dtype(target)
        if ndim == 1 and target.dim() == 1 and target.shape[0] != 1:
            raise ValueError(
                "For 1D input, 1D target must have size 1, but got target size: "
                f"{target.shape[0]}"
            )
        if weight is not None and (weight.dim() != 1 or weight.numel() != C):
            raise RuntimeError(
                f"weight tensor should be defined either for all {C} classes or no classes "
                f"but got weight tensor of shape: {shape_str(weight)}"
            )
    else:
        if ndim == 4 and target.dim() != 3:
            raise RuntimeError(
                "only batches of spatial targets supported (3D tensors) but got targets of "
                f"dimension: {target.dim()}"
            )
        if ndim != 4 and tuple(target.shape[1:]) != tuple(x.shape[2:]):
            expect = "[" + ", ".join(str(s) for s in (x.shape[0], *x.shape[2:])) + "]"
            raise RuntimeError(f"Expected target size {expect}, got {shape_str(target)}")
        _check_target_dtype(target)
        if target.dtype != torch.int64:
            raise RuntimeError(
                f"expected scalar type Long but found {dtype_name(target.dtype)} (target of a "
                f"{ndim}-D input must be int64)"
            )
        if ndim == 4 and tuple(target.shape) != (x.shape[0], *x.shape[2:]):
            raise RuntimeError(
                f"size mismatch (got input: {shape_str(x)} , target: {shape_str(target)}"
            )
        if ndim != 4 and x.numel() == 0 and target.numel() > 0:
            # torch views an empty input as (N, C, 0, 0) and the targets as (N, 1, -1): only
            # possible with no classes, and a mismatch
            n = x.shape[0]
            raise RuntimeError(
                f"size mismatch (got input: [{n}, {x.shape[1]}, 0, 0] , target: "
                f"[{n}, 1, {target.numel() // n}]"
            )
        if weight is not None and weight.numel() != C:
            raise RuntimeError(
                "weight tensor should be defined either for all or no classes "
                f"(expected {C} elements, got weight tensor of shape {shape_str(weight)})"
            )
    if weight is not None and weight.dtype != x.dtype:
        raise RuntimeError(
            f"expected scalar type {dtype_name(x.dtype)} but found {dtype_name(weight.dtype)} "
            "(class weights must have the dtype of the input)"
        )

    if ndim == 1:
        rows = x.unsqueeze(0)
        out_shape: tuple[int, ...] = ()
    elif ndim == 2:
        rows = x
        out_shape = (x.shape[0],)
    else:
        out_shape = (x.shape[0], *x.shape[2:])
        rows = x.movedim(1, -1).reshape(math.prod(out_shape), c_here)
    flat = target.reshape(-1).to(torch.int64)
    check_target_range(flat, C, ignore_index)
    return IndexRows(rows, flat, None if weight is None else weight.reshape(C), out_shape)


def _check_target_dtype(target: Tensor) -> None:
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(
            f"expected target dtype to be Long or Byte, but got {dtype_name(target.dtype)}"
        )


def check_divisor(divisor: Any, reduction: str) -> Tensor:
    """``divisor`` of a ``'sum'`` (transformers' ``num_items_in_batch``): a real number or a
    one-element tensor, as a 0-d float64 tensor."""
    if reduction != "sum":
        raise ValueError(f"divisor divides a sum: it needs reduction='sum', got {reduction!r}")
    if isinstance(divisor, Tensor):
        if divisor.numel() != 1 or divisor.is_complex():
            raise ValueError(
                f"divisor must be a number or a one-element real tensor, got a tensor of shape "
                f"{tuple(divisor.shape)} and dtype {dtype_name(divisor.dtype)}"
            )
        return divisor.detach().reshape(()).to(torch.float64)
    if isinstance(divisor, bool) or not isinstance(divisor, (int, float)):
        raise TypeError(f"divisor must be a number or a tensor, got {type(divisor).__name__}")
    return torch.tensor(float(divisor), dtype=torch.float64)


def unchecked() -> bool:
    """Whether tensor values cannot be read here: Dynamo tracing, or a torch.func transform."""
    from ._transforms import compiling, functorch_active

    return compiling() or functorch_active()


def host_readable(t: Tensor) -> bool:
    """Whether ``t``'s values may be read on the host without waiting for a device: on the CPU
    (Triton's interpreter included). Elsewhere (CUDA) a read would stall the host until the
    device catches up and break CUDA-graph capture, so nothing on the path of a call reads a
    value there: the target range is checked by a device-side assertion, the backward's
    incoming gradient is compared with 1 on the device."""
    return t.device.type == "cpu"


def check_target_range(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise ``IndexError`` naming the first target outside ``[0, C)`` that is not ignored.

    Runs before any kernel: the fused kernels index with targets unchecked. Not while Dynamo
    traces (the custom operators check their targets when they run) nor under a torch.func
    transform (torch's own operations compute the call, and check).

    Off the CPU (:func:`host_readable`) the check is a device-side assertion queued before the
    kernels, as torch's own CUDA kernels do: no host synchronisation, and a bad target stops
    the stream with ``RuntimeError: ... device-side assert triggered`` at the next
    synchronisation, naming the valid range but not the value (the CUDA context is unusable
    after it, as after torch's own assertion).
    """
    if target.numel() == 0 or unchecked():
        return
    if not host_readable(target):
        ok = ((target >= 0) & (target < num_classes)) | (target == ignore_index)
        torch._assert_async(
            ok.all(),
            f"Target out of bounds: targets must lie in [0, {num_classes}) or equal "
            f"ignore_index={ignore_index}",
        )
        return
    lo, hi = torch.aminmax(target)
    if bool((lo >= 0) & (hi < num_classes)):  # all in range: no per-target masks
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        value = int(target[pos])
        raise IndexError(
            f"Target {value} is out of bounds. (found at flattened position {pos}; targets "
            f"must lie in [0, {num_classes}) or equal ignore_index={ignore_index})"
        )


# --------------------------------------------------------------------------------------------
# probability targets


@dataclass(frozen=True)
class ProbRows:
    """A probability-target problem flattened to rows: ``x`` and ``target`` both ``(M, C)``."""

    x: Tensor
    target: Tensor
    out_shape: tuple[int, ...]


def prob_rows(
    x: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, label_smoothing: float,
    classes: int | None = None,
) -> ProbRows:  # fmt: skip
    """Check a probability-target problem in torch's order, then flatten it. ``classes``: how
    many class weights there are (the input's class dim by default)."""
    if not target.dtype.is_floating_point:
        raise RuntimeError(
            "Expected floating point type for target with class probabilities, "
            f"got {dtype_name(target.dtype)}"
        )
    if ignore_index >= 0:
        raise RuntimeError(
            "ignore_index is not supported for floating point target "
            f"(got ignore_index={ignore_index})"
        )
    ndim = x.dim()
    if ndim == 0:
        raise IndexError("Dimension specified as 1 but tensor has no dimensions")
    C = x.shape[0] if ndim == 1 else x.shape[1]
    n_weights = C if classes is None else classes
    if weight is not None and (weight.dim() != 1 or weight.numel() != n_weights):
        raise RuntimeError(
            f"cross_entropy: weight tensor should be defined either for all {n_weights} classes "
            f"or no classes but got weight tensor of shape: {shape_str(weight)}"
        )
    check_floating(x, softmax_kernel_name("log_softmax", 1, ndim))
    check_label_smoothing(label_smoothing)
    if ndim == 1:
        return ProbRows(x.unsqueeze(0), target.unsqueeze(0), ())
    if ndim == 2:
        return ProbRows(x, target, (x.shape[0],))
    out_shape = (x.shape[0], *x.shape[2:])
    m = math.prod(out_shape)
    return ProbRows(
        x.movedim(1, -1).reshape(m, C), target.movedim(1, -1).reshape(m, C), out_shape
    )


def implicit_softmax_dim(name: str, ndim: int, stacklevel: int) -> int:
    """torch's deprecated implicit dim: 0 for 0-, 1- and 3-D input, else 1 (with a warning)."""
    warnings.warn(
        f"Implicit dimension choice for {name} has been deprecated. "
        "Change the call to include dim=X as an argument.",
        stacklevel=stacklevel,
    )
    return 0 if ndim in (0, 1, 3) else 1


def _byte_span(t: Tensor) -> tuple[int, int]:
    """The bytes ``t``'s elements can occupy: ``[first, last + itemsize)``."""
    lo = hi = t.data_ptr()
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if size > 1:
            step = (size - 1) * stride * t.element_size()
            lo, hi = (lo + step, hi) if step < 0 else (lo, hi + step)
    return lo, hi + t.element_size()


def check_inplace(x: Tensor, *others: Tensor | None) -> None:
    """torch's checks before an in-place write into ``x`` (``inplace_backward=True``), made
    before anything is written: no leaf that requires grad (nor a view of one), no element
    written twice (an expanded tensor), and no overlap with the tensors the kernels read while
    they write (the targets, the weights), which would be overwritten before use."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return  # no gradient is wanted: nothing will be written
    base = x._base if x._is_view() else None
    if x.is_leaf:
        raise RuntimeError(
            "a leaf Variable that requires grad is being used in an in-place operation. "
            "(inplace_backward=True writes the gradient over the input logits)"
        )
    if base is not None and base.is_leaf and base.requires_grad:
        raise RuntimeError(
            "a view of a leaf Variable that requires grad is being used in an in-place "
            "operation. (inplace_backward=True writes the gradient over the input logits)"
        )
    if x.numel() > 1 and torch._debug_has_internal_overlap(x) == 1:
        raise RuntimeError(
            "unsupported operation: more than one element of the written-to tensor refers to "
            "a single memory location. Please clone() the tensor before performing the "
            f"operation. (input logits of shape {shape_str(x)} and strides {list(x.stride())} "
            "with inplace_backward=True)"
        )
    if x.numel() == 0:
        return
    lo, hi = _byte_span(x)
    storage = x.untyped_storage().data_ptr()
    for name, t in zip(("target", "weight"), others, strict=False):
        if t is None or t.numel() == 0 or t.device != x.device:
            continue
        if t.untyped_storage().data_ptr() != storage:
            continue
        t_lo, t_hi = _byte_span(t)
        if t_lo < hi and lo < t_hi:
            raise RuntimeError(
                "unsupported operation: some elements of the input tensor and the written-to "
                "tensor refer to a single memory location. Please clone() the tensor before "
                f"performing the operation. (the {name} lies in the memory of the input logits "
                "that inplace_backward=True overwrites)"
            )


def loss_arguments(
    fn: str, input: Any, target: Any, weight: Any, size_average: Any, ignore_index: Any,
    reduce: Any, reduction: Any, label_smoothing: Any, z_loss: Any, softcap: Any,
    temperature: Any,
) -> tuple[str, int, float, tuple[float, float | None, float]]:  # fmt: skip
    """torch's checks of cross_entropy's arguments (``fn`` names the function in messages);
    returns the reduction, ignore_index, label_smoothing and the extensions."""
    red = reduction_string(size_average, reduce, reduction)
    check_tensor(fn, "input", 1, input)
    check_tensor(fn, "target", 2, target)
    check_tensor(fn, "weight", 3, weight, optional=True)
    ii = as_int(fn, "ignore_index", 5, ignore_index)
    ls = as_float(fn, "label_smoothing", 6, label_smoothing)
    return red, ii, ls, check_extensions(z_loss, softcap, temperature)


def check_index_input(input: Tensor, label_smoothing: float) -> None:
    """torch's checks of class-index cross entropy's input, before the targets'."""
    check_label_smoothing(label_smoothing)
    check_floating(input, softmax_kernel_name("log_softmax", 1, input.dim()))
    wrap_dim(0 if input.dim() == 1 else 1, input.dim())


def token_target(
    target: Tensor, data: Tensor, num_classes: int, ignore_index: int, what: str
) -> Tensor:
    """``target`` of the token statistics checked (shape ``data.shape[:-1]``, int64, in range)
    and flattened."""
    if tuple(target.shape) != tuple(data.shape[:-1]):
        raise ValueError(
            f"expected target of shape {tuple(data.shape[:-1])} ({what}), got {tuple(target.shape)}"
        )
    if target.dtype != torch.int64:
        raise RuntimeError(f"expected target dtype to be Long, but got {dtype_name(target.dtype)}")
    flat = target.reshape(-1)
    check_target_range(flat, num_classes, ignore_index)
    return flat


def check_linear_dtypes(x: Tensor, w: Tensor, b: Tensor | None) -> None:
    """torch's errors for a linear layer whose input, weight and bias differ in dtype."""
    if x.dtype != w.dtype:
        raise RuntimeError(
            f"expected m1 and m2 to have the same dtype, but got: {dtype_name(x.dtype)} "
            f"!= {dtype_name(w.dtype)}"
        )
    if b is not None and b.dtype != x.dtype:
        raise RuntimeError(
            f"expected bias to have the dtype of the input, {dtype_name(x.dtype)}, "
            f"got {dtype_name(b.dtype)}"
        )
