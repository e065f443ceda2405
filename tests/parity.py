"""Same lambda, two libraries: run one call through torch and through crossent, compare all.

A call is written once, as a function of a *library*::

    check_same(lambda lib, x, t: lib.cross_entropy(x, t, reduction="sum"), x, t, backend=b)
    check_same("cross_entropy", x, t, reduction="sum", backend=b)          # same thing

``lib`` is :data:`TORCH` (``torch.nn.functional``'s functions and ``torch.nn``'s modules) or
:func:`crossent_lib` (crossent's, with ``backend=`` bound). Each library gets its own clones
of the inputs, as fresh leaf tensors, so neither run can see the other's autograd state or
in-place writes. Then :func:`check_same` requires:

- the same outputs: exact shape, dtype, device and ``requires_grad``; NaN, +inf and -inf at
  exactly the same positions; finite values close (:data:`TOLERANCES`), or else no farther
  than torch's from torch's float64 evaluation of the same call (:data:`LOW_PRECISION`);
- the same warnings (category and text), in forward and in backward;
- the same input gradients after backpropagating one seeded, non-uniform ``grad_output``
  (a random value other than 1 for scalar outputs): ``.grad`` is ``None`` for both or for
  neither, and otherwise has the same shape and dtype and close values;
- inputs left unchanged by both runs (a backend may write into a buffer, never into the
  caller's tensors).

:func:`check_same_exception` is the twin for bad input: both raise, with the *same* exception
type (``NotImplementedError`` is not ``RuntimeError``), and crossent's message contains the key
fragment of torch's; or neither raises and :func:`check_same`'s comparison holds.

Modelled on tinygrad's ``helper_test_op`` / ``helper_test_exception``.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

import crossent
import crossent.nn
from crossent import testing

OPS = ("softmax", "log_softmax", "nll_loss", "cross_entropy", "linear_cross_entropy")
MODULES = (
    "CrossEntropyLoss", "NLLLoss", "Softmax", "LogSoftmax", "LinearCrossEntropyLoss"
)

# torch.testing.assert_close's own defaults per dtype, written out so the rule is visible:
# (rtol, atol). Two implementations that each round correctly differ by an ulp or two.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
}
# Bit-parity with torch is neither possible nor wanted in half precision (TORCH_SEMANTICS §3):
# a value outside the tolerance above still passes when crossent is at least as close as torch
# to torch's float64 evaluation of the same call (the project's one rule,
# crossent.testing.compare). Pass half-precision tensors as arguments, not cast inside the
# lambda, so that the float64 evaluation really is float64.
LOW_PRECISION = (torch.float16, torch.bfloat16)

# (None for what an older torch lacks: torch 2.13 added the linear cross entropy)
TORCH = SimpleNamespace(
    name="torch",
    **{op: getattr(F, op, None) for op in OPS},
    **{m: getattr(torch.nn, m, None) for m in MODULES},
)


@functools.cache
def crossent_lib(backend: str = "auto") -> SimpleNamespace:
    """crossent's functions and modules, with ``backend=`` bound."""
    return SimpleNamespace(
        name=f"crossent[{backend}]",
        **{op: functools.partial(getattr(crossent, op), backend=backend) for op in OPS},
        **{m: functools.partial(getattr(crossent.nn, m), backend=backend) for m in MODULES},
    )


Fn = Callable[..., Any]


def _as_call(fn: Fn | str) -> Fn:
    if isinstance(fn, str):
        name = fn
        return lambda lib, *a, **k: getattr(lib, name)(*a, **k)
    return fn


# --------------------------------------------------------------------------------------------
# inputs


def _map(tree: Any, f: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(tree, torch.Tensor):
        return f(tree)
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map(v, f) for v in tree)
    if isinstance(tree, dict):
        return {k: _map(v, f) for k, v in tree.items()}
    return tree


def _tensors(tree: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    _map(tree, out.append)
    return out


def _differentiable(t: torch.Tensor) -> bool:
    return t.dtype.is_floating_point or t.dtype.is_complex


def _leaf(t: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    # clone() keeps the strides of dense tensors (channels_last stays channels_last)
    return t.detach().clone().requires_grad_(requires_grad and _differentiable(t))


def _template(args: tuple, kwargs: dict, grad: bool) -> tuple[tuple, dict]:
    """Fresh leaves: floating positional tensors require grad when ``grad``; every other
    tensor (``weight=``, targets given by keyword) keeps its own ``requires_grad``."""
    a = tuple(_map(v, lambda t: _leaf(t, t.requires_grad or grad)) for v in args)
    k = _map(kwargs, lambda t: _leaf(t, t.requires_grad))
    return a, k


def _clone(tree: Any) -> Any:
    return _map(tree, lambda t: _leaf(t, t.requires_grad))


# --------------------------------------------------------------------------------------------
# running one library


@dataclass
class Outcome:
    """What one library did with one call."""

    lib: str
    leaves: list[torch.Tensor]
    value: Any = None
    error: BaseException | None = None
    warnings: list[tuple[type, str]] = field(default_factory=list)
    backward_error: BaseException | None = None
    backward_warnings: list[tuple[type, str]] = field(default_factory=list)


def _run_forward(lib: SimpleNamespace, fn: Fn, args: tuple, kwargs: dict) -> Outcome:
    a, k = _clone(args), _clone(kwargs)
    out = Outcome(lib.name, _tensors((a, k)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out.value = fn(lib, *a, **k)
        except Exception as e:  # compared with the other library's, never swallowed
            out.error = e
    out.warnings = [(w.category, str(w.message)) for w in caught]
    return out


def _grad_outputs(value: Any, seed: int) -> list[torch.Tensor | None]:
    """One seeded ``grad_output`` per output: N(0,1) values, or U(0.25, 1.75) for 0-d outputs
    (never exactly 1 in the output's dtype: 1 is the common case, not the only one)."""
    gen = torch.Generator().manual_seed(seed)
    grads: list[torch.Tensor | None] = []
    for t in _tensors(value):
        if not t.requires_grad:
            grads.append(None)
        elif t.dim() == 0:
            g = (0.25 + 1.5 * torch.rand((), generator=gen, dtype=torch.float64)).to(t.dtype)
            grads.append(g if g != 1 else torch.tensor(0.75, dtype=t.dtype))
        else:
            grads.append(torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype))
    return grads


def _run_backward(out: Outcome, grads: list[torch.Tensor | None]) -> None:
    pairs = [(t, g) for t, g in zip(_tensors(out.value), grads, strict=True) if g is not None]
    if not pairs:
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        except Exception as e:
            out.backward_error = e
    out.backward_warnings = [(w.category, str(w.message)) for w in caught]


# --------------------------------------------------------------------------------------------
# comparing


def _fail(what: str, msg: str) -> None:
    raise AssertionError(f"{what}: {msg}")


def _close_or_as_good(
    actual: torch.Tensor,
    expected: torch.Tensor,
    what: str,
    oracle: Callable[[], torch.Tensor | None] | None,
) -> None:
    rtol, atol = TOLERANCES.get(expected.dtype, TOLERANCES[torch.float32])
    try:
        torch.testing.assert_close(
            actual, expected, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}"
        )
    except AssertionError:
        if oracle is None:
            raise
        ref = oracle()
        if ref is None:
            raise
        testing.assert_close_to_oracle(actual, ref, torch_actual=expected, what=what)


def assert_same_tensor(
    actual: Any,
    expected: Any,
    what: str = "output",
    oracle: Callable[[], torch.Tensor | None] | None = None,
) -> None:
    """crossent's ``actual`` against torch's ``expected``: exact metadata and non-finite
    positions; values within :data:`TOLERANCES`, or else (when ``oracle`` gives the float64
    evaluation) no farther from it than torch is (see :data:`LOW_PRECISION`)."""
    if not isinstance(expected, torch.Tensor):
        if actual != expected:
            _fail(what, f"crossent gave {actual!r}, torch {expected!r}")
        return
    if not isinstance(actual, torch.Tensor):
        _fail(what, f"crossent gave a {type(actual).__name__}, torch a Tensor")
    if actual.shape != expected.shape:
        _fail(what, f"shape {tuple(actual.shape)} != torch's {tuple(expected.shape)}")
    if actual.dtype != expected.dtype:
        _fail(what, f"dtype {actual.dtype} != torch's {expected.dtype}")
    if actual.device != expected.device:
        _fail(what, f"device {actual.device} != torch's {expected.device}")
    a, e = actual.detach(), expected.detach()
    if e.is_complex():  # e.g. the gradient of a complex input cast by softmax's dtype=
        real = torch.view_as_real
        assert_same_tensor(real(a.resolve_conj()), real(e.resolve_conj()), what, None)
    elif _differentiable(e):
        for name, pred in (("NaN", torch.isnan), ("+inf", torch.isposinf),
                           ("-inf", torch.isneginf)):
            pa, pe = pred(a), pred(e)
            if not torch.equal(pa, pe):
                where = (pa != pe).nonzero()[0].tolist()
                _fail(
                    what,
                    f"{name} positions differ, first at {where}: crossent "
                    f"{a[tuple(where)].item()}, torch {e[tuple(where)].item()}",
                )
        _close_or_as_good(a, e, what, oracle)
    elif not torch.equal(a, e):
        _fail(what, f"values differ:\ncrossent {a}\ntorch    {e}")


def _unchanged(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and values, NaN equal to NaN."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def _upcast(tree: Any) -> Any:
    def f(t: torch.Tensor) -> torch.Tensor:
        if t.dtype in LOW_PRECISION or t.dtype == torch.float32:
            return t.detach().to(torch.float64).requires_grad_(t.requires_grad)
        return t.detach().clone().requires_grad_(t.requires_grad)

    return _map(tree, f)


def _oracle_run(
    fn: Fn, args: tuple, kwargs: dict, grads: list[torch.Tensor | None]
) -> Outcome | None:
    """torch on float64 copies of every floating input (and of the same ``grad_output``
    values): the reference for half precision."""
    ref = _run_forward(TORCH, fn, _upcast(args), _upcast(kwargs))
    if ref.error is not None or len(_tensors(ref.value)) != len(grads):
        return None
    up = [None if g is None else g.to(torch.float64) for g in grads]
    outs = _tensors(ref.value)
    _run_backward(ref, [g if t.requires_grad else None for g, t in zip(up, outs, strict=True)])
    return None if ref.backward_error is not None else ref


def _compare(
    ours: Outcome,
    theirs: Outcome,
    fn: Fn,
    args: tuple,
    kwargs: dict,
    seed: int,
    check_warnings: bool,
) -> None:
    grads = _grad_outputs(theirs.value, seed)
    oracle_cache: list[Outcome | None] = []

    def oracle() -> Outcome | None:
        if not oracle_cache:
            oracle_cache.append(_oracle_run(fn, args, kwargs, grads))
        return oracle_cache[0]

    def nth_output(i: int) -> Callable[[], torch.Tensor | None]:
        def get() -> torch.Tensor | None:
            ref = oracle()
            return None if ref is None else _tensors(ref.value)[i]

        return get

    def nth_grad(i: int) -> Callable[[], torch.Tensor | None]:
        def get() -> torch.Tensor | None:
            ref = oracle()
            return None if ref is None else ref.leaves[i].grad

        return get

    if check_warnings and ours.warnings != theirs.warnings:
        _fail("warnings", f"crossent {ours.warnings} != torch {theirs.warnings}")
    outs, touts = _tensors(ours.value), _tensors(theirs.value)
    if type(ours.value) is not type(theirs.value) or len(outs) != len(touts):
        _fail("output", f"crossent returned {ours.value!r}, torch {theirs.value!r}")
    if not outs:
        assert_same_tensor(ours.value, theirs.value)
    for i, (o, t) in enumerate(zip(outs, touts, strict=True)):
        assert_same_tensor(o, t, f"output {i}", nth_output(i))
        if o.requires_grad != t.requires_grad:
            _fail(f"output {i}", f"requires_grad {o.requires_grad} != torch's {t.requires_grad}")

    _run_backward(theirs, grads)
    _run_backward(ours, grads)
    if check_warnings and ours.backward_warnings != theirs.backward_warnings:
        _fail(
            "backward warnings",
            f"crossent {ours.backward_warnings} != torch {theirs.backward_warnings}",
        )
    if theirs.backward_error is not None or ours.backward_error is not None:
        _same_error(ours.backward_error, theirs.backward_error, "backward")
        return
    originals = _tensors((args, kwargs))
    leaves = zip(ours.leaves, theirs.leaves, originals, strict=True)
    for i, (leaf, tleaf, orig) in enumerate(leaves):
        for who, x in (("crossent", leaf), ("torch", tleaf)):
            if not _unchanged(x.detach(), orig.detach()):
                _fail(f"input {i}", f"{who} modified its input in place")
        if (leaf.grad is None) != (tleaf.grad is None):
            _fail(f"grad of input {i}", f"crossent .grad={leaf.grad}, torch .grad={tleaf.grad}")
        if tleaf.grad is not None:
            assert_same_tensor(leaf.grad, tleaf.grad, f"grad of input {i}", nth_grad(i))


# --------------------------------------------------------------------------------------------
# exceptions

_VARIABLE = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?|\[[^\]]*\]")


def key_fragment(message: str) -> str:
    """The part of torch's message a reimplementation must repeat.

    torch's first line up to its first number or shape (``Expected input batch_size``); when
    that prefix is shorter than 8 characters (``Target 3 is out...``, ``0D or 1D ...``), the
    longest literal piece between numbers and shapes instead (``is out of bounds.``).
    """
    lines = message.strip().splitlines()
    first = lines[0].strip() if lines else ""
    pieces = [p.strip(" ()[]:,") for p in _VARIABLE.split(first)]
    return pieces[0] if len(pieces[0]) >= 8 else max(pieces, key=len)


def _message(e: BaseException) -> str:
    # KeyError's str() adds quotes; everything here is Runtime/Value/Index/Type/NotImplemented
    return str(e.args[0]) if e.args and isinstance(e.args[0], str) else str(e)


def _same_error(ours: BaseException | None, theirs: BaseException | None, when: str) -> None:
    if theirs is None:
        _fail(when, f"torch succeeded but crossent raised {type(ours).__name__}: {ours}")
    if ours is None:
        _fail(when, f"torch raised {type(theirs).__name__}: {theirs}; crossent did not raise")
    if type(ours) is not type(theirs):
        _fail(
            when,
            f"crossent raised {type(ours).__name__}: {ours}\n"
            f"torch raised    {type(theirs).__name__}: {theirs}",
        )
    frag = key_fragment(_message(theirs))
    if frag not in _message(ours):
        _fail(when, f"crossent's message {_message(ours)!r} lacks torch's {frag!r}")


# --------------------------------------------------------------------------------------------
# public helpers


def check_same(
    fn: Fn | str,
    *args: Any,
    backend: str = "auto",
    grad: bool = True,
    seed: int = 0,
    check_warnings: bool = True,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """Run ``fn(lib, *args, **kwargs)`` with torch and with crossent; require the same result.

    ``grad``: floating tensors among ``args`` (at any depth) are made to require grad; tensors
    in ``kwargs`` keep their own flag, so a ``weight=`` requires grad only when given so.
    ``grad=False`` keeps every flag as given. ``seed`` picks the ``grad_output``;
    ``check_warnings=False`` skips the warning comparison. Returns
    ``(crossent's value, torch's value)``.
    """
    call = _as_call(fn)
    a, k = _template(args, kwargs, grad)
    theirs = _run_forward(TORCH, call, a, k)
    if theirs.error is not None:
        raise AssertionError(
            f"torch raised {type(theirs.error).__name__}: {theirs.error} (use "
            "check_same_exception for calls that are meant to fail)"
        ) from theirs.error
    ours = _run_forward(crossent_lib(backend), call, a, k)
    if ours.error is not None:
        raise AssertionError(
            f"crossent raised {type(ours.error).__name__}: {ours.error}; torch did not"
        ) from ours.error
    _compare(ours, theirs, call, a, k, seed, check_warnings)
    return ours.value, theirs.value


def check_same_exception(
    fn: Fn | str,
    *args: Any,
    backend: str = "auto",
    expected: type[BaseException] | None = None,
    match: str | None = None,
    grad: bool = True,
    seed: int = 0,
    check_warnings: bool = True,
    **kwargs: Any,
) -> tuple[BaseException | None, BaseException | None]:
    """Run ``fn`` with torch and crossent; both raise the same exception type (crossent's
    message containing :func:`key_fragment` of torch's), or neither raises and the results
    match as in :func:`check_same`.

    ``expected``/``match``: when given, torch must raise exactly ``expected`` and *both*
    messages must contain ``match`` (a catalogue entry: pins torch's behaviour too).
    ``grad`` and the rest as in :func:`check_same`. Returns
    ``(crossent's exception, torch's exception)``, both ``None`` when neither raised.
    """
    call = _as_call(fn)
    a, k = _template(args, kwargs, grad)
    theirs = _run_forward(TORCH, call, a, k)
    ours = _run_forward(crossent_lib(backend), call, a, k)
    if expected is not None:
        if type(theirs.error) is not expected:
            _fail("torch", f"expected {expected.__name__}, torch gave {theirs.error!r}")
    if theirs.error is None and ours.error is None:
        _compare(ours, theirs, call, a, k, seed, check_warnings)
        return None, None
    _same_error(ours.error, theirs.error, f"forward ({ours.lib})")
    assert ours.error is not None and theirs.error is not None
    if match is not None:
        for who, e in (("torch", theirs.error), ("crossent", ours.error)):
            if match not in _message(e):
                _fail(who, f"message {_message(e)!r} lacks {match!r}")
    return ours.error, theirs.error
