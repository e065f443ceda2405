"""crossent is a drop-in for torch's API: signatures, docs, errors, warnings, argument
conversions, module behaviour and the ``backend=`` argument.

Every behavioural check runs the same lambda through torch and crossent (``tests/parity.py``)
on both backends. The error catalogue is TORCH_SEMANTICS.md §9, row by row: each case pins
torch's exception type and message (so the catalogue cannot drift from torch) and requires
crossent's to be the same type with the same words.
"""

from __future__ import annotations

import copy
import inspect
import math
import pickle
import re
import warnings
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from parity import (
    assert_same_tensor,
    check_same,
    check_same_exception,
    crossent_lib,
    key_fragment,
)

import crossent
import crossent.functional
import crossent.nn
from crossent import dispatch, testing

FUNCTIONS = ["softmax", "log_softmax", "nll_loss", "cross_entropy"]
MODULES = ["CrossEntropyLoss", "NLLLoss", "Softmax", "LogSoftmax"]
KW = inspect.Parameter.KEYWORD_ONLY


def logits(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return testing.make_logits(shape, dtype, seed)


def targets(*shape: int, C: int = 3, seed: int = 0) -> torch.Tensor:
    return testing.make_targets(shape, C, seed)


def probs(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return testing.make_probs(shape, dtype)


def T(*values: Any, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


X23, Y2, P23, W3 = logits(2, 3), T(0, 2), probs(2, 3), testing.make_weight(3)


# ============================================================================================
# (a) signatures


def _param_spec(p: inspect.Parameter) -> tuple[str, Any, Any]:
    return (p.name, p.kind, p.default)


# crossent's own keyword-only arguments, after torch's parameters
EXTRAS: dict[str, list[tuple[str, Any, Any]]] = {
    "cross_entropy": [
        ("backend", KW, "auto"), ("inplace_backward", KW, False), ("z_loss", KW, 0.0),
        ("softcap", KW, None), ("temperature", KW, 1.0),
    ],
}


def _assert_torch_signature_plus_backend(ours: Any, theirs: Any, name: str = "") -> None:
    o = list(inspect.signature(ours).parameters.values())
    t = list(inspect.signature(theirs).parameters.values())
    extras = EXTRAS.get(name, [("backend", KW, "auto")])
    assert [_param_spec(p) for p in o[: len(t)]] == [_param_spec(p) for p in t]
    assert [_param_spec(p) for p in o[len(t):]] == extras


@pytest.mark.parametrize("name", FUNCTIONS)
def test_function_signature_is_torchs_plus_backend(name: str) -> None:
    _assert_torch_signature_plus_backend(getattr(crossent, name), getattr(F, name), name)
    assert getattr(crossent, name) is getattr(crossent.functional, name)


@pytest.mark.parametrize("name", MODULES)
def test_module_init_signature_is_torchs_plus_backend(name: str) -> None:
    _assert_torch_signature_plus_backend(
        getattr(crossent.nn, name).__init__, getattr(torch.nn, name).__init__
    )
    assert getattr(crossent, name) is getattr(crossent.nn, name)


# ============================================================================================
# (b) docstrings


def _documented(doc: str | None, names: list[str]) -> list[str]:
    return [n for n in names if not re.search(rf"\b{re.escape(n)}\b", doc or "")]


@pytest.mark.parametrize("name", FUNCTIONS)
def test_function_doc_names_every_parameter(name: str) -> None:
    fn = getattr(crossent, name)
    params = list(inspect.signature(fn).parameters)
    assert _documented(fn.__doc__, params) == []


@pytest.mark.parametrize("name", MODULES)
def test_module_doc_names_every_parameter(name: str) -> None:
    cls = getattr(crossent.nn, name)
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    assert _documented(cls.__doc__, params) == []


# ============================================================================================
# (c) the error catalogue, TORCH_SEMANTICS.md §9, and the cases it says torch accepts


def case(id: str, fn: Any, *args: Any, raises: type | None = None, match: str | None = None,
         **kwargs: Any) -> Any:
    return pytest.param(fn, args, kwargs, raises, match, id=id)




def ce(lib: Any, *args: Any, **kwargs: Any) -> Any:
    return lib.cross_entropy(*args, **kwargs)


def nll(lib: Any, *args: Any, **kwargs: Any) -> Any:
    return lib.nll_loss(*args, **kwargs)


def softmax(lib: Any, *args: Any, **kwargs: Any) -> Any:
    return lib.softmax(*args, **kwargs)


def log_softmax(lib: Any, *args: Any, **kwargs: Any) -> Any:
    return lib.log_softmax(*args, **kwargs)


def _with_target(shape: tuple[int, ...], index: tuple[int, ...], value: int) -> torch.Tensor:
    t = targets(*shape)
    t[index] = value
    return t


OOB = "Target 3 is out of bounds."
W_ALL = "weight tensor should be defined either for all 3 classes or no classes"
W_ANY = "weight tensor should be defined either for all or no classes"
NOT_DIFF = "The function '{}' is not differentiable with respect to argument 'weight'"
BATCH = "Expected input batch_size (2) to match target batch_size ({})."
SMOOTH = "label_smoothing must be between 0.0 and 1.0. Got: 1.5"
NOT_IMPL = "\"{}\" not implemented for '{}'"
W_GRAD = torch.ones(3, requires_grad=True)

# One row per §9 line, each on the paths where the doc says it applies: class index out of
# range on every input rank (1-D .. 5-D), every reduction, with smoothing and weights, for a
# negative target and for uint8 255; each weight, target-dtype, shape and batch check on the
# 2-D path and the K-d paths, whose checks differ.
CATALOGUE = [
    *(case(f"oob-2d-{r}", ce, X23, T(0, 3), reduction=r, raises=IndexError, match=OOB)
      for r in ("none", "mean", "sum")),
    case("oob-1d", ce, logits(3), T(3)[0], raises=IndexError, match=OOB),
    case("oob-3d", ce, logits(2, 3, 4), _with_target((2, 4), (1, 2), 3), raises=IndexError,
         match=OOB),
    case("oob-4d", ce, logits(2, 3, 2, 2), _with_target((2, 2, 2), (1, 0, 1), 3),
         raises=IndexError, match=OOB),
    case("oob-5d", ce, logits(2, 3, 2, 1, 2), _with_target((2, 2, 1, 2), (0, 1, 0, 1), 3),
         raises=IndexError, match=OOB),
    case("oob-smoothing-weight", ce, X23, T(0, 3), weight=W3, label_smoothing=0.2,
         raises=IndexError, match=OOB),
    case("oob-negative", ce, X23, T(-1, 0), raises=IndexError, match="Target -1 is out of bounds."),
    case("oob-nll-uint8-255", nll, X23, T(0, 255, dtype=torch.uint8), raises=IndexError,
         match="Target 255 is out of bounds."),
    case("oob-nll-4d", nll, logits(2, 3, 2, 2), _with_target((2, 2, 2), (0, 0, 0), 3),
         raises=IndexError, match=OOB),
    case("oob-C0", ce, logits(2, 0), T(0, 0), raises=IndexError,
         match="Target 0 is out of bounds."),
    # weight shape
    case("weight-numel-2d", ce, X23, Y2, weight=torch.ones(2), raises=RuntimeError,
         match=W_ALL + " but got weight tensor of shape: [2]"),
    case("weight-not-1d-2d", ce, X23, Y2, weight=torch.ones(1, 3), raises=RuntimeError,
         match=W_ALL + " but got weight tensor of shape: [1, 3]"),
    case("weight-0d-2d", ce, X23, Y2, weight=torch.tensor(1.0), raises=RuntimeError, match=W_ALL),
    case("weight-numel-1d", ce, logits(3), T(1)[0], weight=torch.ones(2), raises=RuntimeError,
         match=W_ALL),
    case("weight-numel-nll", nll, X23, Y2, weight=torch.ones(4), raises=RuntimeError,
         match=W_ALL),
    *(case(f"weight-numel-{k}d", ce, logits(2, 3, *[2] * (k - 2)), targets(2, *[2] * (k - 2)),
           weight=torch.ones(2), raises=RuntimeError, match=W_ANY) for k in (3, 4, 5)),
    case("weight-numel-prob", ce, X23, P23, weight=torch.ones(2), raises=RuntimeError,
         match="cross_entropy: " + W_ALL),
    case("weight-not-1d-prob", ce, X23, P23, weight=torch.ones(1, 3), raises=RuntimeError,
         match="cross_entropy: " + W_ALL),
    # weight dtype (class-index paths: no promotion)
    case("weight-dtype-2d", ce, X23, Y2, weight=torch.ones(3, dtype=torch.float64),
         raises=RuntimeError, match="expected scalar type Float but found Double"),
    case("weight-dtype-4d", ce, logits(2, 3, 2, 2), targets(2, 2, 2),
         weight=torch.ones(3, dtype=torch.float64), raises=RuntimeError,
         match="expected scalar type Float but found Double"),
    case("weight-dtype-smoothing", ce, X23, Y2, weight=torch.ones(3, dtype=torch.float64),
         label_smoothing=0.1, raises=RuntimeError,
         match="expected scalar type Float but found Double"),
    case("weight-dtype-nll-f64-input", nll, logits(2, 3, dtype=torch.float64), Y2,
         weight=torch.ones(3), raises=RuntimeError,
         match="expected scalar type Double but found Float"),
    case("weight-dtype-half", nll, X23, Y2, weight=torch.ones(3, dtype=torch.float16),
         raises=RuntimeError, match="expected scalar type Float but found Half"),
    # weight requiring grad (class-index paths refuse it in forward)
    case("weight-grad-1d", ce, logits(3), T(1)[0], weight=W_GRAD, raises=RuntimeError,
         match=NOT_DIFF.format("nll_loss_forward")),
    case("weight-grad-2d", ce, X23, Y2, weight=W_GRAD, raises=RuntimeError,
         match=NOT_DIFF.format("nll_loss_forward")),
    case("weight-grad-smoothing", ce, X23, Y2, weight=W_GRAD, label_smoothing=0.1,
         raises=RuntimeError, match=NOT_DIFF.format("nll_loss_forward")),
    case("weight-grad-nll", nll, X23, Y2, weight=W_GRAD, raises=RuntimeError,
         match=NOT_DIFF.format("nll_loss_forward")),
    *(case(f"weight-grad-{k}d", ce, logits(2, 3, *[2] * (k - 2)), targets(2, *[2] * (k - 2)),
           weight=W_GRAD, raises=RuntimeError, match=NOT_DIFF.format("nll_loss2d_forward"))
      for k in (3, 4, 5)),
    # target dtype on the class-index path (torch's C++ names: Int, Short, Char, ...)
    *(case(f"target-{dt}", ce, X23, Y2.to(dt), raises=RuntimeError,
           match=f"expected target dtype to be Long or Byte, but got {name}")
      for dt, name in ((torch.int32, "Int"), (torch.int16, "Short"), (torch.int8, "Char"),
                       (torch.bool, "Bool"), (torch.float32, "Float"),
                       (torch.float64, "Double"))),
    *(case(f"target-uint8-{k}d", ce, logits(2, 3, *[2] * (k - 2)),
           targets(2, *[2] * (k - 2)).to(torch.uint8), raises=RuntimeError,
           match="expected scalar type Long but found Byte") for k in (3, 4, 5)),
    case("prob-target-long", ce, X23, targets(2, 3), raises=RuntimeError,
         match="Expected floating point type for target with class probabilities, got Long"),
    case("prob-target-bool", ce, X23, targets(2, 3, C=2).bool(), raises=RuntimeError,
         match="Expected floating point type for target with class probabilities, got Bool"),
    # batch and shape checks
    case("batch-mismatch", ce, X23, T(0, 1, 2), raises=ValueError, match=BATCH.format(3)),
    case("batch-0d-target", ce, X23, T(0)[0], raises=ValueError, match=BATCH.format(0)),
    case("batch-mismatch-4d", nll, logits(2, 3, 2, 2), targets(3, 2, 2), raises=ValueError,
         match=BATCH.format(3)),
    case("1d-target-size-2", ce, logits(3), T(0, 1), raises=ValueError,
         match="For 1D input, 1D target must have size 1, but got target size: 2"),
    case("multi-target-2d", ce, X23, T([0], [1]), raises=RuntimeError,
         match="0D or 1D target tensor expected, multi-target not supported"),
    case("prob-target-wrong-shape", ce, X23, probs(2, 4), raises=RuntimeError,
         match="0D or 1D target tensor expected, multi-target not supported"),
    case("spatial-3d", ce, logits(2, 3, 4), targets(2, 5), raises=RuntimeError,
         match="Expected target size [2, 4], got [2, 5]"),
    case("spatial-5d", ce, logits(2, 3, 2, 2, 2), targets(2, 2, 2, 3), raises=RuntimeError,
         match="Expected target size [2, 2, 2, 2], got [2, 2, 2, 3]"),
    case("spatial-4d", ce, logits(2, 3, 2, 2), targets(2, 2, 3), raises=RuntimeError,
         match="size mismatch (got input: [2, 3, 2, 2] , target: [2, 2, 3]"),
    case("4d-target-not-3d", ce, logits(2, 3, 2, 2), targets(2, 4), raises=RuntimeError,
         match="only batches of spatial targets supported (3D tensors) but got targets of "
               "dimension: 2"),
    case("nll-0d-input", nll, torch.tensor(1.0), T(0)[0], raises=ValueError,
         match="Expected 1 or more dimensions (got 0)"),
    case("ce-0d-input-1d-target", ce, torch.tensor(1.0), T(0), raises=IndexError,
         match="Dimension out of range (expected to be in range of [-1, 0], but got 1)"),
    # probability targets: ignore_index >= 0 is refused (not "!= -100")
    *(case(f"prob-ignore-index-{ii}", ce, X23, P23, ignore_index=ii, raises=RuntimeError,
           match="ignore_index is not supported for floating point target") for ii in (0, 5)),
    case("smoothing-1.5-index", ce, X23, Y2, label_smoothing=1.5, raises=RuntimeError,
         match=SMOOTH),
    case("smoothing-1.5-prob", ce, X23, P23, label_smoothing=1.5, raises=RuntimeError,
         match=SMOOTH),
    # reduction strings: case-sensitive, None is not a default; checked before anything else
    *(case(f"reduction-{fn.__name__}-{r}", fn, X23, Y2, reduction=r, raises=ValueError,
           match=f"{r} is not a valid value for reduction")
      for fn in (ce, nll) for r in ("foo", "MEAN", None, "")),
    case("reduction-before-tensor-checks", ce, "not a tensor", Y2, reduction="foo",
         raises=ValueError, match="foo is not a valid value for reduction"),
    # non-floating logits
    case("logits-long", ce, X23.long(), Y2, raises=NotImplementedError,
         match=NOT_IMPL.format("log_softmax_lastdim_kernel_impl", "Long")),
    case("logits-complex", ce, X23.to(torch.complex64), Y2, raises=NotImplementedError,
         match=NOT_IMPL.format("log_softmax_lastdim_kernel_impl", "ComplexFloat")),
    case("logits-long-prob", ce, X23.long(), P23, raises=NotImplementedError,
         match=NOT_IMPL.format("log_softmax_lastdim_kernel_impl", "Long")),
    case("logits-long-4d", ce, logits(2, 3, 2, 2).long(), targets(2, 2, 2),
         raises=NotImplementedError, match=NOT_IMPL.format("log_softmax_kernel_impl", "Long")),
    case("nll-input-long", nll, X23.long(), Y2, raises=NotImplementedError,
         match=NOT_IMPL.format("nll_loss_out_frame", "Long")),
    case("nll-input-bool", nll, X23.bool(), Y2, raises=NotImplementedError,
         match=NOT_IMPL.format("nll_loss_out_frame", "Bool")),
    case("nll-input-long-4d", nll, logits(2, 3, 2, 2).long(), targets(2, 2, 2),
         raises=NotImplementedError, match=NOT_IMPL.format("nll_loss2d_forward_out_frame", "Long")),
    # softmax: integer input without dtype=, dtype=torch.long, dim out of range
    case("softmax-long", softmax, X23.long(), 1, raises=NotImplementedError,
         match=NOT_IMPL.format("softmax_lastdim_kernel_impl", "Long")),
    case("log_softmax-long", log_softmax, X23.long(), 1, raises=NotImplementedError,
         match=NOT_IMPL.format("log_softmax_lastdim_kernel_impl", "Long")),
    case("softmax-dtype-long", softmax, X23, 1, dtype=torch.long, raises=NotImplementedError,
         match=NOT_IMPL.format("softmax_lastdim_kernel_impl", "Long")),
    # torch names the kernel "softmax_kernel_impl" when dim is not the last one
    case("softmax-long-dim0", softmax, X23.long(), 0, raises=NotImplementedError,
         match=NOT_IMPL.format("softmax_kernel_impl", "Long")),
    case("log_softmax-long-dim0", log_softmax, X23.long(), 0, raises=NotImplementedError,
         match=NOT_IMPL.format("log_softmax_kernel_impl", "Long")),
    *(case(f"softmax-dim-{d}", softmax, X23, d, raises=IndexError,
           match=f"Dimension out of range (expected to be in range of [-2, 1], but got {d})")
      for d in (2, -3)),
    case("softmax-0d-dim-1", log_softmax, torch.tensor(1.0), 1, raises=IndexError,
         match="Dimension out of range (expected to be in range of [-1, 0], but got 1)"),
    # argument types
    *(case(f"ignore_index-{type(v).__name__}-{fn.__name__}", fn, X23, Y2, ignore_index=v,
           raises=TypeError, match=f"argument 'ignore_index' (position 5) must be int, not "
                                   f"{type(v).__name__}")
      for fn in (ce, nll) for v in (1.0, None, True)),
    case("ignore_index-float-tensor", ce, X23, Y2, ignore_index=torch.tensor(1.0),
         raises=TypeError, match="argument 'ignore_index' (position 5) must be int, not Tensor"),
    case("ignore_index-overflow", ce, X23, Y2, ignore_index=2**63, raises=ValueError,
         match="Overflow when unpacking long long"),
    case("weight-list", ce, X23, Y2, [1.0, 1.0, 1.0], raises=TypeError,
         match="cross_entropy_loss(): argument 'weight' (position 3) must be Tensor, not list"),
    case("target-list", ce, X23, [0, 2], raises=TypeError,
         match="cross_entropy_loss(): argument 'target' (position 2) must be Tensor, not list"),
    case("nll-target-list", nll, X23, [0, 2], raises=TypeError,
         match="nll_loss_nd(): argument 'target' (position 2) must be Tensor, not list"),
    case("input-list", ce, [[0.0, 1.0, 2.0]], T(0), raises=TypeError,
         match="argument 'input' (position 1) must be Tensor, not list"),
    *(case(f"label_smoothing-{type(v).__name__}", ce, X23, Y2, label_smoothing=v,
           raises=TypeError, match=f"argument 'label_smoothing' (position 6) must be float, "
                                   f"not {type(v).__name__}")
      for v in ("0.1", None, torch.tensor([0.1]))),
    *(case(f"dim-{type(d).__name__}-{fn.__name__}", fn, X23, d, raises=TypeError,
           match=f"{fn.__name__}(): argument 'dim' (position 1) must be int, not "
                 f"{type(d).__name__}")
      for fn in (softmax, log_softmax) for d in (1.0, "1", True)),
]

def _no_grad(lib: Any, x: torch.Tensor, t: torch.Tensor, weight: torch.Tensor) -> Any:
    with torch.no_grad():
        return lib.cross_entropy(x, t, weight=weight)


# Inputs the catalogue's neighbours say torch *accepts*: crossent must accept them too, with
# the same values and gradients.
ACCEPTED = [
    case("target-equal-ignore-index-out-of-range", ce, X23, T(0, 7), ignore_index=7),
    case("ignore-index-real-class", ce, X23, T(0, 1), ignore_index=0),
    case("prob-ignore-index-negative", ce, X23, P23, ignore_index=-1),
    case("weight-1xC-4d", ce, logits(2, 3, 2, 2), targets(2, 2, 2), weight=torch.ones(1, 3)),
    case("weight-1xC-3d", ce, logits(2, 3, 4), targets(2, 4), weight=W3.view(1, 3)),
    case("weight-0d-4d-one-class", nll, logits(2, 1, 2, 2), targets(2, 2, 2, C=1),
         weight=torch.tensor(2.0)),
    *(case(f"smoothing-{e}", ce, X23, Y2, label_smoothing=e) for e in (-0.5, math.nan, 1.0)),
    case("target-uint8-2d", ce, X23, Y2.to(torch.uint8), reduction="sum"),
    case("target-uint8-nll-1d", nll, logits(3), T(2, dtype=torch.uint8)[0]),
    case("empty-C0", ce, logits(0, 0), T()),
    case("weight-grad-no-grad-mode", _no_grad, X23, Y2, weight=W_GRAD),
    case("prob-weight-promotes", ce, X23, P23, weight=W3.double()),
    case("prob-target-promotes", ce, X23, P23.double()),
    case("prob-target-promotes-half", ce, X23.half(), P23),
    case("prob-target-promotes-bf16-f16", ce, X23.bfloat16(), P23.half()),
]


CASE = ("fn", "args", "kwargs", "raises", "match")


@pytest.mark.parametrize(CASE, CATALOGUE)
def test_error_catalogue(backend: str, fn: Any, args: tuple, kwargs: dict, raises: type,
                         match: str) -> None:
    check_same_exception(fn, *args, backend=backend, expected=raises, match=match, **kwargs)


@pytest.mark.parametrize(CASE, ACCEPTED)
def test_accepted_like_torch(backend: str, fn: Any, args: tuple, kwargs: dict, raises: None,
                             match: None) -> None:
    check_same(fn, *args, backend=backend, **kwargs)


def test_1d_input_with_1_element_target_forward(backend: str) -> None:
    # torch accepts a (1,) target for (C,) logits in forward (its backward then fails, §8)
    check_same(ce, logits(3), T(1), backend=backend, grad=False)


# --------------------------------------------------------------------------------------------
# legacy size_average / reduce, and 'elementwise_mean'

# (size_average, reduce) -> the reduction torch derives (§7); every row of the table, with
# None standing for True
LEGACY = [
    (None, False, "none"),
    (True, False, "none"),
    (True, None, "mean"),
    (True, True, "mean"),
    (False, None, "sum"),
    (False, True, "sum"),
]


@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
@pytest.mark.parametrize(("size_average", "reduce", "derived"), LEGACY)
def test_legacy_arguments_override_reduction(
    backend: str, fn: str, size_average: bool | None, reduce: bool | None, derived: str
) -> None:
    x, t = logits(4, 5), targets(4, C=5)
    explicit = "sum" if derived != "sum" else "none"  # contradicts the derived reduction
    check_same(fn, x, t, None, size_average, -100, reduce, explicit, backend=backend)
    message = f"size_average and reduce args will be deprecated, please use reduction='{derived}'"
    with pytest.warns(UserWarning, match=re.escape(message)):
        got = getattr(crossent, fn)(x, t, size_average=size_average, reduce=reduce,
                                    reduction=explicit, backend=backend)
    assert_same_tensor(got, getattr(F, fn)(x, t, reduction=derived))


@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
def test_elementwise_mean_alias(backend: str, fn: str) -> None:
    x, t = logits(4, 5), targets(4, C=5)
    check_same(fn, x, t, reduction="elementwise_mean", backend=backend)
    with pytest.warns(UserWarning, match="reduction='elementwise_mean' is deprecated"):
        got = getattr(crossent, fn)(x, t, reduction="elementwise_mean", backend=backend)
    assert_same_tensor(got, getattr(F, fn)(x, t, reduction="mean"))


# --------------------------------------------------------------------------------------------
# positional calls: the 4th argument is size_average, the 5th ignore_index


def test_positional_fifth_argument_is_ignore_index(backend: str) -> None:
    x, t, w = logits(6, 7), T(5, 1, 5, 0, 6, 5), testing.make_weight(7)
    ours, _ = check_same(lambda lib, x, t, w=None: lib.cross_entropy(x, t, w, None, 5), x, t,
                         w=w, backend=backend)
    assert_same_tensor(ours, F.cross_entropy(x, t, w, ignore_index=5))
    assert not torch.allclose(ours, F.cross_entropy(x, t, w))  # the 5s really were ignored


@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
def test_fully_positional_call(backend: str, fn: str) -> None:
    x, t, w = logits(6, 7), T(5, 1, 5, 0, 6, 5), testing.make_weight(7)
    extra = (0.1,) if fn == "cross_entropy" else ()
    check_same(lambda lib, x, t, w=None: getattr(lib, fn)(x, t, w, None, 5, None, "none", *extra),
               x, t, w=w, backend=backend)


def test_softmax_third_positional_is_stacklevel_not_dtype(backend: str) -> None:
    # F.softmax(x, 1, torch.float64) binds float64 to _stacklevel: the dtype is ignored
    ours, _ = check_same(lambda lib, x: lib.softmax(x, 1, torch.float64), X23, backend=backend)
    assert ours.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# scalar argument conversions

# label_smoothing: 0-d float tensors (float32, float64), a 0-d int tensor, Python int and bool
# (1/True mean full smoothing, False none), a NumPy float
SMOOTHINGS = [torch.tensor(0.2), torch.tensor(0.2, dtype=torch.float64), torch.tensor(1), 1,
              True, False, np.float32(0.2), np.float64(0.3)]


@pytest.mark.parametrize("label_smoothing", SMOOTHINGS, ids=repr)
def test_label_smoothing_conversions(backend: str, label_smoothing: Any) -> None:
    check_same(ce, X23, Y2, label_smoothing=label_smoothing, backend=backend)
    check_same(ce, X23, P23, label_smoothing=label_smoothing, backend=backend)


# ignore_index: 0-d integer tensors (int64, int32, uint8), NumPy integers, and a 1-element
# 1-D tensor (torch takes it through __index__)
IGNORE_INDICES = [torch.tensor(2), torch.tensor(2, dtype=torch.int32),
                  torch.tensor(2, dtype=torch.uint8), np.int64(2), np.int32(2), np.uint8(2),
                  torch.tensor([2])]


@pytest.mark.parametrize("ignore_index", IGNORE_INDICES, ids=repr)
@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
def test_ignore_index_conversions(backend: str, fn: str,
                                  ignore_index: Any) -> None:
    ours, theirs = check_same_exception(
        fn, logits(4, 3), T(2, 0, 2, 1), ignore_index=ignore_index, backend=backend, grad=True
    )
    assert theirs is None  # torch accepts them all


# --------------------------------------------------------------------------------------------
# softmax: implicit dim, dtype=

# dim=None: 0-, 1- and 3-D input normalise over dim 0, 2-, 4- and 5-D over dim 1 (§5)
IMPLICIT_DIM = [((), 0), ((4,), 0), ((3, 4), 1), ((2, 3, 4), 0), ((2, 3, 2, 2), 1),
                ((2, 3, 2, 1, 2), 1)]


@pytest.mark.parametrize(("shape", "dim"), IMPLICIT_DIM, ids=str)
@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
def test_softmax_implicit_dim(backend: str, fn: str, shape: tuple[int, ...], dim: int) -> None:
    x = logits(*shape)
    check_same(fn, x, backend=backend)  # same values, gradients and warning text
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = getattr(crossent, fn)(x, backend=backend)
        getattr(F, fn)(x)
    assert [str(w.message) for w in caught] == [
        f"Implicit dimension choice for {fn} has been deprecated. Change the call to include "
        "dim=X as an argument."
    ] * 2
    # both warnings point at this line's file (the caller), not into either library
    assert [w.filename for w in caught] == [__file__] * 2
    assert_same_tensor(got, getattr(F, fn)(x, dim))


def _call_twice(cls: str) -> Any:
    def call(lib: Any, x: torch.Tensor) -> list[torch.Tensor]:
        module = getattr(lib, cls)()  # dim=None is stored, and resolved at every forward
        return [module(x), module(x)]

    return call


@pytest.mark.parametrize("cls", ["Softmax", "LogSoftmax"])
def test_softmax_module_implicit_dim_warns_every_call(backend: str, cls: str) -> None:
    x = logits(2, 3, 4)
    check_same(_call_twice(cls), x, backend=backend)  # values (over dim 0) and both warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _call_twice(cls)(crossent_lib(backend), x)
    assert [w.category for w in caught] == [UserWarning] * 2


# input dtypes cast by dtype= before the op: integers, bool, and half (whose gradient flows
# back in half); and a float64 output from float32 input
SOFTMAX_CASTS = [(torch.int64, torch.float32), (torch.uint8, torch.float32),
                 (torch.bool, torch.float64), (torch.float16, torch.float32),
                 (torch.float32, torch.float64)]


@pytest.mark.parametrize(("in_dtype", "dtype"), SOFTMAX_CASTS, ids=str)
@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
@pytest.mark.parametrize("dim", [0, 1])  # not the last dim, the last dim
def test_softmax_dtype_argument(backend: str, fn: str, dim: int, in_dtype: torch.dtype,
                                dtype: torch.dtype) -> None:
    x = (logits(3, 5) * 2).to(in_dtype)
    ours, _ = check_same(fn, x, dim, dtype=dtype, backend=backend)
    assert ours.dtype == dtype


# ============================================================================================
# (d) modules

LOSS_MODULES = ["CrossEntropyLoss", "NLLLoss"]


@pytest.mark.parametrize("name", MODULES)
def test_module_is_a_torch_module(name: str) -> None:
    ours, theirs = getattr(crossent.nn, name)(), getattr(torch.nn, name)()
    assert isinstance(ours, getattr(torch.nn, name))
    assert repr(ours) == repr(theirs)
    assert type(ours).__constants__ == type(theirs).__constants__
    assert list(ours.parameters()) == []


@pytest.mark.parametrize("name", LOSS_MODULES)
def test_weight_is_a_buffer(backend: str, name: str) -> None:
    w = testing.make_weight(3)
    ours = getattr(crossent.nn, name)(weight=w.clone(), backend=backend)
    theirs = getattr(torch.nn, name)(weight=w.clone())
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight"]
    assert [n for n, _ in ours.named_buffers()] == ["weight"]
    assert torch.equal(ours.state_dict()["weight"], w)
    assert list(getattr(crossent.nn, name)().state_dict()) == []  # None: no entry
    # a state_dict saved from torch's module loads into crossent's, and the reverse
    ours.load_state_dict({"weight": 2 * w})
    assert torch.equal(ours.weight, 2 * w)
    theirs.load_state_dict(ours.state_dict())
    assert torch.equal(theirs.weight, 2 * w)


@pytest.mark.parametrize("name", LOSS_MODULES)
def test_double_converts_weight(backend: str, name: str) -> None:
    w = testing.make_weight(3)
    module = getattr(crossent.nn, name)(weight=w, backend=backend).double()
    assert module.weight.dtype == torch.float64
    assert torch.equal(module.weight, w.double())
    check_same(lambda lib, x, t: getattr(lib, name)(weight=w).double()(x, t),
               logits(4, 3, dtype=torch.float64), targets(4), backend=backend)
    check_same(lambda lib, x, t: getattr(lib, name)(weight=w.double()).float()(x, t),
               logits(4, 3), targets(4), backend=backend)


def _mutations(lib: Any, x: torch.Tensor, t: torch.Tensor, w: torch.Tensor) -> list[Any]:
    m = lib.CrossEntropyLoss()
    outs = [m(x, t)]
    m.reduction = "sum"
    outs.append(m(x, t))
    m.ignore_index = 1
    outs.append(m(x, t))
    m.label_smoothing = 0.3
    outs.append(m(x, t))
    m.weight = w
    outs.append(m(x, t))
    m.reduction = "none"
    outs.append(m(x, t))
    return outs


def test_cross_entropy_module_mutation_takes_effect(backend: str) -> None:
    x, t, w = logits(5, 3), T(0, 1, 2, 1, 0), testing.make_weight(3)
    ours, _ = check_same(lambda lib, x, t, w=None: _mutations(lib, x, t, w), x, t, w=w,
                         backend=backend)
    # each mutation changed the result (so a module that ignored it would fail above)
    assert len({round(float(o.detach()), 6) for o in ours[:-1]}) == len(ours) - 1
    assert ours[-1].shape == (5,)


def test_nll_module_mutation_takes_effect(backend: str) -> None:
    def steps(lib: Any, x: torch.Tensor, t: torch.Tensor, w: torch.Tensor | None = None) -> Any:
        m = lib.NLLLoss()
        outs = [m(x, t)]
        m.ignore_index, m.reduction = 2, "none"
        outs.append(m(x, t))
        m.weight = w
        outs.append(m(x, t))
        return outs

    check_same(steps, logits(5, 3), T(0, 1, 2, 1, 2), w=testing.make_weight(3), backend=backend)


@pytest.mark.parametrize("cls", ["Softmax", "LogSoftmax"])
def test_softmax_module_dim_mutation(backend: str, cls: str) -> None:
    def steps(lib: Any, x: torch.Tensor) -> Any:
        m = getattr(lib, cls)(dim=1)
        first = m(x)
        m.dim = 0
        return [first, m(x)]

    check_same(steps, logits(3, 4), backend=backend)


# constructor arguments torch stores without checking; the call raises (same type as torch)
UNCHECKED = [
    pytest.param("CrossEntropyLoss", {"reduction": "foo"}, ValueError, id="reduction"),
    pytest.param("CrossEntropyLoss", {"label_smoothing": 2.0}, RuntimeError, id="smoothing"),
    pytest.param("CrossEntropyLoss", {"ignore_index": 1.5}, TypeError, id="ignore_index"),
    pytest.param("CrossEntropyLoss", {"weight": torch.ones(2)}, RuntimeError, id="weight"),
    pytest.param("NLLLoss", {"reduction": None}, ValueError, id="nll-reduction"),
]


@pytest.mark.parametrize(("name", "kwargs", "raises"), UNCHECKED)
def test_constructor_does_not_validate(backend: str, name: str, kwargs: dict,
                                       raises: type) -> None:
    module = getattr(crossent.nn, name)(**kwargs, backend=backend)  # constructs
    key, value = next(iter(kwargs.items()))
    assert getattr(module, key) is value
    check_same_exception(lambda lib, x, t: getattr(lib, name)(**kwargs)(x, t), X23, Y2,
                         backend=backend, expected=raises)


@pytest.mark.parametrize(("size_average", "reduce", "derived"), LEGACY)
def test_module_legacy_arguments(backend: str, size_average: Any, reduce: Any,
                                 derived: str) -> None:
    with pytest.warns(UserWarning, match=f"please use reduction='{derived}' instead"):
        module = crossent.nn.CrossEntropyLoss(size_average=size_average, reduce=reduce,
                                              backend=backend)
    assert module.reduction == derived
    check_same(lambda lib, x, t: lib.CrossEntropyLoss(None, size_average, -100, reduce)(x, t),
               X23, Y2, backend=backend)


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))],
                         ids=["deepcopy", "pickle"])
def test_module_copies_keep_backend_and_weight(backend: str, clone: Any) -> None:
    w = testing.make_weight(3)
    module = clone(crossent.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1, backend=backend))
    assert module.backend == backend
    assert_same_tensor(module(X23, Y2), F.cross_entropy(X23, Y2, w, label_smoothing=0.1))


# ============================================================================================
# (e) messages name the offending value

# the bad target at a known place: 2-D (flat position 2), 1-D logits with a 0-d target
# (position 0), 4-D (index (1, 0, 1) = flat 5), 3-D (index (1, 3) = flat 7); positive and
# negative values, with and without smoothing
BAD_TARGETS = [
    ((4, 3), (4,), (2,), 7, {}),
    ((3,), (), (), -4, {}),
    ((2, 3, 2, 2), (2, 2, 2), (1, 0, 1), 9, {"label_smoothing": 0.1}),
    ((2, 3, 4), (2, 4), (1, 3), -2, {"reduction": "none"}),
]


@pytest.mark.parametrize(("xshape", "tshape", "where", "value", "kwargs"), BAD_TARGETS, ids=str)
def test_out_of_bounds_message_names_value_and_position(
    backend: str, xshape: tuple, tshape: tuple, where: tuple, value: int, kwargs: dict
) -> None:
    t = targets(*tshape)
    t[where] = value
    ours, _ = check_same_exception(ce, logits(*xshape), t, backend=backend, expected=IndexError,
                                   match=f"Target {value} is out of bounds.", **kwargs)
    flat = int(np.ravel_multi_index(where, tshape)) if tshape else 0
    positions = {str(flat), str(list(where)), str(tuple(where))}
    rest = str(ours).split("out of bounds.", 1)[1]
    assert any(re.search(rf"(?<![\d-]){re.escape(p)}(?!\d)", rest) for p in positions), str(ours)


# ============================================================================================
# (f) backend=


def _valid_call(name: str, x: torch.Tensor, **kw: Any) -> Any:
    if name in ("softmax", "log_softmax"):
        return getattr(crossent, name)(x, 1, **kw)
    return getattr(crossent, name)(x, targets(x.shape[0]), **kw)


# a usual input, and an empty one (nothing to compute is no excuse to accept a bad name)
@pytest.mark.parametrize("x", [X23, logits(0, 3)], ids=["2x3", "0x3"])
@pytest.mark.parametrize("name", FUNCTIONS)
def test_unknown_backend_raises_value_error_listing_names(
    name: str, x: torch.Tensor
) -> None:
    with pytest.raises(ValueError) as info:
        _valid_call(name, x, backend="nope")
    for valid in ("auto", *dispatch.available()):
        assert repr(valid) in str(info.value) or f"{valid}" in str(info.value)
    assert "nope" in str(info.value)


@pytest.mark.parametrize("name", MODULES)
def test_module_with_unknown_backend_raises_at_call(name: str) -> None:
    if "Softmax" in name:
        module, args = getattr(crossent.nn, name)(1, backend="nope"), (X23,)
    else:
        module, args = getattr(crossent.nn, name)(backend="nope"), (X23, Y2)
    with pytest.raises(ValueError, match="nope"):
        module(*args)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_every_available_backend_runs(name: str) -> None:
    results = [_valid_call(name, X23, backend=b) for b in ("auto", *dispatch.available())]
    for r in results[1:]:
        assert_same_tensor(r, results[0])


# ============================================================================================
# warnings crossent must not add


def test_softmax_backward_with_underflowed_half_output_warns_nothing(
    backend: str,
) -> None:
    x = torch.tensor([[0.0, -20.0, 5.0]], dtype=torch.float16)  # exp(-25) underflows to 0
    check_same("softmax", x, 1, backend=backend)


# ============================================================================================
# the helpers themselves can fail


def test_assert_same_tensor_catches_differences() -> None:
    a = torch.tensor([1.0, math.nan, math.inf])
    assert_same_tensor(a.clone(), a)
    for bad in (torch.tensor([1.0, math.nan, -math.inf]), torch.tensor([1.0, 0.0, math.inf]),
                torch.tensor([1.001, math.nan, math.inf]), a.double(), a[:2]):
        with pytest.raises(AssertionError):
            assert_same_tensor(bad, a)


def test_key_fragment() -> None:
    assert key_fragment("Expected input batch_size (2) to match target batch_size (3).") == (
        "Expected input batch_size")
    assert key_fragment("Target 3 is out of bounds.") == "is out of bounds."
    assert key_fragment("0D or 1D target tensor expected, multi-target not supported") == (
        "D target tensor expected, multi-target not supported")


def test_check_same_sees_another_library() -> None:
    # a lambda that behaves differently in crossent must fail the comparison
    lib = crossent_lib("torch")
    with pytest.raises(AssertionError):
        check_same(lambda L, x: L.softmax(x, 1) * (1.001 if L is lib else 1.0), X23,
                   backend="torch")
    with pytest.raises(AssertionError):
        check_same_exception(lambda L, x: L.softmax(x, 5 if L is lib else 1), X23,
                             backend="torch")
