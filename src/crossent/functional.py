"""Public functions with torch.nn.functional's exact signatures, plus ``backend=``.

Each function checks its arguments in torch's order (:mod:`crossent._args`), flattens the
problem to ``(M, V)`` row blocks, resolves the backend (:mod:`crossent.dispatch`) and calls one
autograd Function (:mod:`crossent._autograd`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _args, _composite, _docs, _ops
from ._autograd import (
    LossOptions,
    NllLoss,
    Softmax,
    SoftmaxOptions,
    StatsOptions,
    TokenStatsFunction,
)
from ._calls import cross_entropy_loss, index_cross_entropy
from ._linear import (
    DEFAULT_CHUNK_BYTES,
    LinearCrossEntropy,
    LinearOptions,
    LinearTokenStatsFunction,
    chunk_rows,
    default_chunk_rows,
)
from ._transforms import compiling, composed
from .backends.base import RowOptions
from .dispatch import BackendName, hands_off, resolve

__all__ = [
    "softmax",
    "log_softmax",
    "nll_loss",
    "cross_entropy",
    "linear_cross_entropy",
    "token_stats",
    "linear_token_stats",
    "TokenStats",
]


def _autocast_dtype(t: Any) -> torch.dtype | None:
    """The autocast dtype of ``t``'s device where autocast is on for it, else None."""
    if not isinstance(t, Tensor):
        return None
    dev = t.device.type
    try:
        on = torch.is_autocast_enabled(dev)
    except TypeError:  # a torch whose query takes no device
        on = torch.is_autocast_enabled() if dev == "cuda" else torch.is_autocast_cpu_enabled()
    if not on:
        return None
    get = getattr(torch, "get_autocast_dtype", None)
    if get is not None:
        return get(dev)
    return torch.get_autocast_gpu_dtype() if dev == "cuda" else torch.get_autocast_cpu_dtype()


def _cast(t: Any, dtype: torch.dtype) -> Any:
    """What autocast does to an argument: floating tensors other than float64 cast to
    ``dtype`` (differentiably), anything else as it is."""
    if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64:
        return t.to(dtype)
    return t


def _dense(*tensors: Any) -> bool:
    """Whether every tensor given is strided (dense): sparse and other layouts go to torch,
    which raises what it raises for them."""
    return all(not isinstance(t, Tensor) or t.layout == torch.strided for t in tensors)


def _softmax(
    name: str, input: Tensor, dim: Any, stacklevel: int, dtype: Any, backend: str, log: bool
) -> Tensor:
    _args.check_tensor(name, "input", 0, input)
    if not _dense(input):
        fn = F.log_softmax if log else F.softmax
        return fn(input, dim, stacklevel + 1, dtype)
    if input.device.type != "cpu" and dtype is None and _autocast_dtype(input) is not None:
        # autocast runs softmax and log_softmax in float32 off the CPU (torch's
        # "fp32_set_opt_dtype" policy: dtype=float32 unless one is given)
        if input.is_floating_point() and input.dtype != torch.float64:
            dtype = torch.float32
    if dim is None:
        dim = _args.implicit_softmax_dim(name, input.dim(), stacklevel + 1)
    dim = _args.as_int(name, "dim", 1, dim)
    if dtype is not None:
        input = input.to(dtype)  # torch casts before the op; the gradient flows back through it
    _args.check_floating(input, _args.softmax_kernel_name(name, dim, input.dim()))
    d = _args.wrap_dim(dim, input.dim())
    if (backend == "auto" and hands_off(name, input)) or composed(input):
        return torch.log_softmax(input, d) if log else torch.softmax(input, d)
    opts = SoftmaxOptions(resolve(backend, input), log)
    if input.numel() == 0:
        return input.clone(memory_format=torch.contiguous_format)
    apply = _ops.softmax if compiling() else Softmax.apply
    if input.dim() == 0:
        return apply(input.reshape(1, 1), opts).reshape(())
    moved = input if d == input.dim() - 1 else input.movedim(d, -1)
    rows = moved.reshape(-1, moved.shape[-1])  # (M, V); a copy only if not viewable
    out = apply(rows, opts).view(moved.shape)
    if d != input.dim() - 1:
        out = out.movedim(-1, d).contiguous()  # torch returns contiguous output
    return out


def softmax(
    input: Tensor,
    dim: int | None = None,
    _stacklevel: int = 3,
    dtype: torch.dtype | None = None,
    *,
    backend: BackendName = "auto",
) -> Tensor:
    return _softmax("softmax", input, dim, _stacklevel, dtype, backend, log=False)


def log_softmax(
    input: Tensor,
    dim: int | None = None,
    _stacklevel: int = 3,
    dtype: torch.dtype | None = None,
    *,
    backend: BackendName = "auto",
) -> Tensor:
    return _softmax("log_softmax", input, dim, _stacklevel, dtype, backend, log=True)


def nll_loss(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    *,
    backend: BackendName = "auto",
) -> Tensor:
    if _autocast_dtype(input) is not None:  # autocast: nll_loss runs in float32
        with torch.autocast(input.device.type, enabled=False):
            return nll_loss(
                _cast(input, torch.float32), target, _cast(weight, torch.float32),
                size_average, ignore_index, reduce, reduction, backend=backend,
            )
    if not _dense(input, target, weight):
        return F.nll_loss(input, target, weight, size_average, ignore_index, reduce, reduction)
    red = _args.reduction_string(size_average, reduce, reduction)
    fn = "nll_loss_nd"
    _args.check_tensor(fn, "input", 1, input)
    _args.check_tensor(fn, "target", 2, target)
    _args.check_tensor(fn, "weight", 3, weight, optional=True)
    ii = _args.as_int(fn, "ignore_index", 5, ignore_index)
    if input.dim() >= 1:
        frame = "nll_loss2d_forward_out_frame" if input.dim() >= 3 else "nll_loss_out_frame"
        _args.check_floating(input, frame)
    if (backend == "auto" and hands_off("nll_loss", input)) or composed(input, target, weight):
        return F.nll_loss(input, target, weight, None, ii, None, red)
    rows = _args.index_rows(input, target, weight, ii, "nll_loss")
    opts = LossOptions(resolve(backend, input), RowOptions(ignore_index=ii), red)
    apply = _ops.nll_loss if compiling() else NllLoss.apply
    loss = apply(rows.x, rows.target, rows.weight, opts)
    return loss.view(rows.out_shape) if red == "none" else loss


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    backend: BackendName = "auto",
    inplace_backward: bool = False,
    z_loss: float = 0.0,
    softcap: float | None = None,
    temperature: float = 1.0,
) -> Tensor:
    if type(input).__name__ == "DTensor":  # logits sharded on the class dim, or replicated
        from .distributed import dtensor_cross_entropy, is_dtensor

        if is_dtensor(input):
            return dtensor_cross_entropy(
                input, target, weight, size_average, ignore_index, reduce, reduction,
                label_smoothing, whole=cross_entropy, backend=backend,
                inplace_backward=inplace_backward, z_loss=z_loss, softcap=softcap,
                temperature=temperature,
            )  # fmt: skip
    if _autocast_dtype(input) is not None:  # autocast: cross entropy runs in float32
        with torch.autocast(input.device.type, enabled=False):
            f32 = torch.float32
            return cross_entropy(
                _cast(input, f32), _cast(target, f32), _cast(weight, f32), size_average,
                ignore_index, reduce, reduction, label_smoothing, backend=backend,
                inplace_backward=inplace_backward, z_loss=z_loss, softcap=softcap,
                temperature=temperature,
            )
    red, ii, ls, (zl, cap, temp) = _args.loss_arguments(
        "cross_entropy_loss", input, target, weight, size_average, ignore_index, reduce,
        reduction, label_smoothing, z_loss, softcap, temperature,
    )  # fmt: skip
    plain = zl == 0.0 and cap is None and temp == 1.0 and inplace_backward is False
    transformed = composed(input, target, weight)
    if transformed and inplace_backward:
        raise RuntimeError(
            "inplace_backward=True cannot be used under torch.func transforms or forward-mode "
            "AD: they need the logits, which it overwrites"
        )
    if (
        (backend == "auto" and plain and hands_off("cross_entropy", input))
        or (plain and transformed)
        or not _dense(input, target, weight)
    ):
        if not plain:
            raise NotImplementedError(
                f"crossent's cross_entropy options (z_loss, softcap, temperature, "
                f"inplace_backward) take strided tensors only, got input of layout {input.layout}"
            )
        return F.cross_entropy(input, target, weight, None, ii, None, red, ls)
    if input.shape == target.shape:
        prob = _args.prob_rows(input, target, weight, ii, ls)
        if inplace_backward:
            _args.check_inplace(input, target, weight)
        row_opts = RowOptions(
            label_smoothing=_args.effective_smoothing(ls), z_loss=zl, softcap=cap,
            temperature=temp,
        )
        opts = LossOptions(
            resolve(backend, input), row_opts, red, torch.is_grad_enabled(), inplace_backward
        )
        if inplace_backward and _wants_prob_extras(input, target, weight):
            raise RuntimeError(
                "inplace_backward=True cannot be used when the target or the weight requires "
                "grad: their gradients need the logits, which it overwrites"
            )
        loss = cross_entropy_loss(prob.x, prob.target, weight, opts, prob=True)
        return loss.view(prob.out_shape) if red == "none" else loss
    _args.check_index_input(input, ls)
    return index_cross_entropy(
        input, target, weight, red, ii, ls, (zl, cap, temp), inplace_backward, backend
    )


def _wants_prob_extras(input: Tensor, target: Tensor, weight: Tensor | None) -> bool:
    """Whether a probability-target call needs the gradient of its logits and also of its
    target or weight (which are computed from the logits)."""
    if not (torch.is_grad_enabled() and input.requires_grad):
        return False
    return target.requires_grad or (weight is not None and weight.requires_grad)


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    options: Any = None,
    backend: BackendName = "auto",
    chunk_bytes: int | None = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    logits_dtype: torch.dtype | None = None,
    divisor: float | Tensor | None = None,
) -> Tensor:
    if not _dense(input, linear_weight, linear_bias, target, weight):
        torch_fn = getattr(F, "linear_cross_entropy", None)
        plain = z_loss == 0.0 and softcap is None and temperature == 1.0
        plain = plain and logits_dtype is None and divisor is None
        if torch_fn is None or not plain:
            raise NotImplementedError(
                "crossent's linear_cross_entropy takes strided tensors only"
                + ("" if torch_fn is None else
                   " with z_loss, softcap, temperature, logits_dtype or divisor")
                + f", got input of layout {input.layout} and linear_weight of layout "
                f"{linear_weight.layout}"
            )
        return torch_fn(
            input, linear_weight, target, linear_bias=linear_bias, weight=weight,
            reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
            options=options,
        )
    if divisor is not None:
        divisor = _args.check_divisor(divisor, _args.reduction_string(None, None, reduction))
    if logits_dtype is not None and not (
        isinstance(logits_dtype, torch.dtype) and logits_dtype.is_floating_point
    ):
        raise TypeError(f"logits_dtype must be a floating-point torch.dtype, got {logits_dtype!r}")
    batch_shape = None
    if input.dim() > 2 and linear_weight.dim() == 2:
        # (..., D) hidden states with (...) class indices or (..., V) probabilities, which
        # torch refuses: as rows (other targets get torch's error for the input)
        lead = tuple(input.shape[:-1])
        v = linear_weight.shape[0]
        if tuple(target.shape) in (lead, (*lead, v)):
            batch_shape = lead
            target = target.reshape(-1) if target.shape == lead else target.reshape(-1, v)
            input = input.reshape(-1, input.shape[-1])
    loss = _linear_autocast(
        input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
        label_smoothing, options, backend, chunk_bytes, z_loss, softcap, temperature,
        logits_dtype, divisor,
    )  # fmt: skip
    if batch_shape is not None and reduction == "none":
        return loss.view(batch_shape)
    return loss


def _linear_autocast(
    input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Tensor | None,
    weight: Tensor | None, reduction: str, ignore_index: int | None, label_smoothing: float,
    options: Any, backend: BackendName, chunk_bytes: int | None, z_loss: float,
    softcap: float | None, temperature: float, logits_dtype: torch.dtype | None,
    divisor: Tensor | None,
) -> Tensor:  # fmt: skip
    """:func:`linear_cross_entropy` of rows, under autocast or not."""
    # torch.autocast: the linear layer in the autocast dtype, the cross entropy in float32
    ac_dtype = _autocast_dtype(input)
    if ac_dtype is not None:
        target, weight = _cast(target, torch.float32), _cast(weight, torch.float32)
        params = (input, linear_weight, linear_bias)
        compute = None
        if all(t is None or _cast(t, ac_dtype).dtype == ac_dtype for t in params):
            # every matmul operand is cast: the fused path casts them itself, and gives
            # the parameters' gradients in their own dtypes, summed without a 16-bit rounding
            compute = ac_dtype
        else:  # as autocast would: float64 operands stay, and torch's checks then apply
            input, linear_weight, linear_bias = (_cast(t, ac_dtype) for t in params)
        with torch.autocast(input.device.type, enabled=False):
            return _linear_cross_entropy(
                input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                label_smoothing, options, backend, chunk_bytes, z_loss, softcap, temperature,
                logits_dtype or torch.float32, compute, divisor,
            )
    return _linear_cross_entropy(
        input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
        label_smoothing, options, backend, chunk_bytes, z_loss, softcap, temperature,
        logits_dtype, None, divisor,
    )


def _linear_cross_entropy(
    input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Tensor | None,
    weight: Tensor | None, reduction: str, ignore_index: int | None, label_smoothing: float,
    options: Any, backend: BackendName, chunk_bytes: int | None, z_loss: float,
    softcap: float | None, temperature: float, logits_dtype: torch.dtype | None,
    compute_dtype: torch.dtype | None, divisor: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """:func:`linear_cross_entropy`, with the cross entropy taking the logits as
    ``logits_dtype`` (float32 under autocast, the input's dtype when None) and, when
    ``compute_dtype`` is given, the matmuls' operands cast to it (autocast's linear layer);
    a ``'sum'`` divided by ``divisor`` when given."""
    if input.dim() < 1 or input.dim() > 2:
        raise RuntimeError(f"expected input with dimensionality 1 or 2, got {input.dim()}")
    if linear_weight.dim() < 2:
        raise RuntimeError(
            "expected linear_weight with dimensionality at least 2, got "
            f"{linear_weight.dim()}"
        )
    batch = tuple(input.shape[:-1])
    d = input.shape[-1]
    if d != linear_weight.shape[-1]:
        raise RuntimeError(
            "expected equal input and linear_weight last dimensions (in_features), "
            f"got {d} and {linear_weight.shape[-1]}, respectively"
        )
    v = linear_weight.shape[0]
    out_features = tuple(linear_weight.shape[1:-1])
    if linear_bias is not None and tuple(linear_bias.shape) != (v, *out_features):
        raise RuntimeError(
            f"expected linear_bias shape {(v, *out_features)}, got {tuple(linear_bias.shape)}"
        )
    if out_features and not batch:
        raise RuntimeError(
            f"K-dimensional loss defined by linear_weight shape {tuple(linear_weight.shape)} "
            f"requires batched input, (N, {d}), got unbatched input with shape "
            f"{tuple(input.shape)}"
        )
    logits_shape = (*batch, v, *out_features)
    prob = tuple(target.shape) == logits_shape
    if prob and ignore_index is not None:
        raise RuntimeError("ignore_index cannot be specified when target contains probabilities")
    ii = -100 if ignore_index is None else ignore_index
    _options_warning(options, out_features, reduction, label_smoothing, target, linear_bias)
    if compute_dtype is None:
        _args.check_linear_dtypes(input, linear_weight, linear_bias)
    fused = (
        not out_features
        and not target.requires_grad
        and not (weight is not None and weight.requires_grad)
        and not composed(input, linear_weight, linear_bias, target, weight)
    )
    if not fused:
        # what torch computes, with the logits materialised (K-dimensional loss, or gradients
        # wanted for the target or the class weights)
        w2 = linear_weight.reshape(math.prod(out_features, start=v), d)
        b2 = None if linear_bias is None else linear_bias.reshape(-1)
        if compute_dtype is not None:
            input, w2 = input.to(compute_dtype), w2.to(compute_dtype)
            b2 = None if b2 is None else b2.to(compute_dtype)
        logits = F.linear(input, w2, b2).reshape(logits_shape)
        if logits_dtype is not None:
            logits = logits.to(logits_dtype)
        loss = cross_entropy(
            logits, target, weight, ignore_index=ii, reduction=reduction,
            label_smoothing=label_smoothing, backend=backend, z_loss=z_loss, softcap=softcap,
            temperature=temperature,
        )
        return loss if divisor is None else (loss / divisor).to(loss.dtype)
    red = _args.reduction_string(None, None, reduction)
    fn = "cross_entropy_loss"
    _args.check_tensor(fn, "target", 2, target)
    _args.check_tensor(fn, "weight", 3, weight, optional=True)
    ii = _args.as_int(fn, "ignore_index", 5, ii)
    ls = _args.as_float(fn, "label_smoothing", 6, label_smoothing)
    zl, cap, temp = _args.check_extensions(z_loss, softcap, temperature)
    # the logits as the cross entropy sees them (never materialised)
    mm_dtype = input.dtype if compute_dtype is None else compute_dtype
    ce_dtype = mm_dtype if logits_dtype is None else logits_dtype
    virtual = torch.empty((), dtype=ce_dtype, device=input.device).expand(logits_shape)
    out_dtype = ce_dtype
    if prob:
        checked = _args.prob_rows(virtual, target, weight, ii, ls)
        t2 = checked.target
        out_shape = checked.out_shape
        # torch's promotion of the loss: logits, probabilities and class weights
        out_dtype = torch.promote_types(ce_dtype, target.dtype)
        if weight is not None:
            out_dtype = torch.promote_types(out_dtype, weight.dtype)
    else:
        _args.check_label_smoothing(ls)
        _args.check_floating(virtual, _args.softmax_kernel_name("log_softmax", 1, virtual.dim()))
        rows = _args.index_rows(virtual, target, weight, ii, "nll_loss")
        t2, out_shape = rows.target, rows.out_shape
        weight = rows.weight
    chunk = getattr(options, "batch_chunk_size", None) if options is not None else None
    be = resolve(backend, input)
    if chunk_bytes is None and chunk is None and input.device.type == "cpu":
        rows_per_chunk = default_chunk_rows(
            math.prod(batch), v, d, mm_dtype, linear_weight.dtype, be
        )
    else:
        rows_per_chunk = chunk_rows(v, torch.finfo(mm_dtype).bits // 8, chunk_bytes, chunk)
    opts = LinearOptions(
        backend=be,
        rows=RowOptions(
            ignore_index=ii, label_smoothing=_args.effective_smoothing(ls), z_loss=zl,
            softcap=cap, temperature=temp,
        ),
        reduction=red,
        chunk_rows=rows_per_chunk,
        grad_enabled=torch.is_grad_enabled(),
        out_dtype=out_dtype,
        compute_dtype=compute_dtype,
        divisor=divisor,
    )
    x2 = input.reshape(math.prod(batch), d)  # batch sizes given: D may be 0
    apply = _ops.linear_cross_entropy if compiling() else LinearCrossEntropy.apply
    loss = apply(x2, linear_weight, linear_bias, t2, weight, opts)
    return loss.view(out_shape) if red == "none" else loss


def _options_warning(
    options: Any, out_features: tuple[int, ...], reduction: Any, label_smoothing: Any,
    target: Tensor, bias: Tensor | None,
) -> None:
    """torch's warning when ``options`` asks for its chunked path on a call it cannot take
    (crossent always chunks; the warning is repeated so that calls warn as they do in torch)."""
    if options is None or not (
        out_features
        or reduction not in {"mean", "sum", "none"}
        or label_smoothing != 0.0
        or target.dtype != torch.int64
        or torch.jit.is_tracing()
    ):
        return
    warnings.warn(
        "linear_cross_entropy: ``options`` ignored; chunked path needs "
        "reduction in {'mean','sum','none'}, label_smoothing == 0, target.dtype"
        " == int64, out_features == (). Got "
        f"reduction={reduction!r}, label_smoothing={label_smoothing}, "
        f"target.dtype={target.dtype}, out_features={tuple(out_features)}"
        f", tracing={torch.jit.is_tracing()}"
        f", linear_bias.shape="
        f"{tuple(bias.shape) if bias is not None else None}.",
        stacklevel=3,
    )


class TokenStats(NamedTuple):
    """Per-token results of :func:`token_stats` and :func:`linear_token_stats`, each of the
    target's shape.

    ``logprob``: log-probability of the target (0 where it is ``ignore_index``);
    ``entropy``: entropy of the predicted distribution; ``lse``: log-sum-exp of the logits as
    read; ``argmax``: the most likely class (int64). ``logprob`` and ``entropy`` are
    differentiable.
    """

    logprob: Tensor
    entropy: Tensor
    lse: Tensor
    argmax: Tensor


def _stats_options(
    num_classes: int, itemsize: int, ignore_index: int, softcap: Any, temperature: Any,
    chunk_bytes: int | None, backend: str, like: Tensor,
) -> StatsOptions:  # fmt: skip
    _, cap, temp = _args.check_extensions(0.0, softcap, temperature)
    # 0: the backend's own budget for its temporaries
    rows = 0 if chunk_bytes is None else chunk_rows(num_classes, itemsize, chunk_bytes, None)
    row_opts = RowOptions(ignore_index=int(ignore_index), softcap=cap, temperature=temp)
    return StatsOptions(resolve(backend, like), row_opts, rows, torch.is_grad_enabled())


def token_stats(
    logits: Tensor,
    target: Tensor,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    temperature: float = 1.0,
    chunk_bytes: int | None = None,
    backend: BackendName = "auto",
) -> TokenStats:
    if logits.dim() < 1 or not logits.dtype.is_floating_point:
        raise RuntimeError(
            f"expected floating-point logits with at least 1 dimension, got {logits.dtype} "
            f"of shape {tuple(logits.shape)}"
        )
    v = logits.shape[-1]
    what = "the logits' shape without the class dim"
    flat_t = _args.token_target(target, logits, v, ignore_index, what)
    opts = _stats_options(v, 4, ignore_index, softcap, temperature, chunk_bytes, backend, logits)
    x = logits.reshape(-1, v)
    if composed(x):
        outs = _composite.token_stats(x, flat_t, opts.rows.ignore_index, opts.rows)
        return TokenStats(*(o.view(target.shape) for o in outs))
    x = x if x.is_contiguous() else x.contiguous()
    apply = _ops.token_stats if compiling() else TokenStatsFunction.apply
    return TokenStats(*(o.view(target.shape) for o in apply(x, flat_t, opts)))


def linear_token_stats(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    temperature: float = 1.0,
    chunk_bytes: int | None = None,
    backend: BackendName = "auto",
) -> TokenStats:
    if input.dim() < 1 or linear_weight.dim() != 2 or input.shape[-1] != linear_weight.shape[1]:
        raise RuntimeError(
            "expected input (..., D) and linear_weight (V, D), got "
            f"{tuple(input.shape)} and {tuple(linear_weight.shape)}"
        )
    if input.dtype != linear_weight.dtype or (
        linear_bias is not None and linear_bias.dtype != input.dtype
    ):
        raise RuntimeError("expected input, linear_weight and linear_bias of one dtype")
    v, d = linear_weight.shape
    if linear_bias is not None and tuple(linear_bias.shape) != (v,):
        raise RuntimeError(f"expected linear_bias shape {(v,)}, got {tuple(linear_bias.shape)}")
    what = "the input's shape without the feature dim"
    flat_t = _args.token_target(target, input, v, ignore_index, what)
    budget = DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    opts = _stats_options(
        v, input.element_size(), ignore_index, softcap, temperature, budget, backend, input
    )
    h = input.reshape(-1, d)
    if composed(h, linear_weight, linear_bias):
        logits = F.linear(h, linear_weight, linear_bias)
        outs = _composite.token_stats(logits, flat_t, opts.rows.ignore_index, opts.rows)
        return TokenStats(*(o.view(target.shape) for o in outs))
    h = h if h.is_contiguous() else h.contiguous()
    apply = _ops.linear_token_stats if compiling() else LinearTokenStatsFunction.apply
    outs = apply(h, linear_weight, linear_bias, flat_t, opts)
    return TokenStats(*(o.view(target.shape) for o in outs))


softmax.__doc__ = _docs.SOFTMAX
log_softmax.__doc__ = _docs.LOG_SOFTMAX
nll_loss.__doc__ = _docs.NLL_LOSS
cross_entropy.__doc__ = _docs.CROSS_ENTROPY
linear_cross_entropy.__doc__ = _docs.LINEAR_CROSS_ENTROPY
token_stats.__doc__ = _docs.TOKEN_STATS
linear_token_stats.__doc__ = _docs.LINEAR_TOKEN_STATS
