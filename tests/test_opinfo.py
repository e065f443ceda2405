"""torch's own test inputs, run through crossent: OpInfo samples and ModuleInfo inputs.

Every sample torch uses to test ``F.cross_entropy``, ``F.nll_loss``, ``softmax`` and
``log_softmax`` (plain and ``with_dtype`` variants), and every module input and module error
input torch uses for ``nn.NLLLoss`` and ``nn.CrossEntropyLoss``, goes through the same lambda
in torch and in crossent (``tests/parity.py``): same outputs, same input gradients, or the same
exception type. Shapes are the ones torch gives (small), so the float64 reference backend runs
them too.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import pytest
import torch
from parity import check_same, check_same_exception
from torch.autograd.gradcheck import GradcheckError
from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db

import crossent
import crossent.nn

# OpInfo name -> the function of that name in torch.nn.functional and in crossent
OPINFO_FUNCTIONS = {
    "nn.functional.cross_entropy": "cross_entropy",
    "nn.functional.nll_loss": "nll_loss",
    "softmax": "softmax",
    "log_softmax": "log_softmax",
}
OPINFOS = {
    (op.name, op.variant_test_name): op for op in op_db if op.name in OPINFO_FUNCTIONS
}
MODULEINFOS = {
    m.module_cls.__name__: m
    for m in module_db
    if m.module_cls.__name__ in ("NLLLoss", "CrossEntropyLoss")
}

# float32 / float64: the dtypes torch's gradient tests use, every sample. bfloat16 / float16:
# the half-precision paths (computed in float32 by crossent, natively by torch), also every
# sample: they are small enough to be cheap.
FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# with_dtype variants also take non-float input (cast by dtype= before the op): int64 and
# uint8 (integers), bool, and complex64 (the cast drops the imaginary part, with a warning).
CAST_DTYPES = [torch.int64, torch.uint8, torch.bool, torch.complex64]


def test_every_info_is_found() -> None:
    # a rename in torch's databases must not silently leave nothing to run
    assert sorted(OPINFOS) == [
        ("log_softmax", ""), ("log_softmax", "with_dtype"),
        ("nn.functional.cross_entropy", ""), ("nn.functional.nll_loss", ""),
        ("softmax", ""), ("softmax", "with_dtype"),
    ]
    assert sorted(MODULEINFOS) == ["CrossEntropyLoss", "NLLLoss"]
    for info in MODULEINFOS.values():
        assert info.module_error_inputs_func is not None


def _seeded(make: Any) -> list[Any]:
    # torch's sample makers draw from the global RNG: seed it, without disturbing the caller's
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return list(make())


@functools.cache
def opinfo_samples(name: str, variant: str, dtype: torch.dtype) -> list[Any]:
    op = OPINFOS[(name, variant)]
    grad = dtype.is_floating_point or dtype.is_complex
    # the OpInfo's own sample function; op.sample_inputs only wraps it in a tracking iterator
    # that walks the Python stack for every sample (slow)
    return _seeded(lambda: op.sample_inputs_func(op, "cpu", dtype, grad))


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "x".join(map(str, value.shape)) or "0d"
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return str(value)


def _opinfo_cases() -> list[Any]:
    cases = []
    for name, variant in OPINFOS:
        dtypes = FLOAT_DTYPES + (CAST_DTYPES if variant == "with_dtype" else [])
        for dtype in dtypes:
            for i, s in enumerate(opinfo_samples(name, variant, dtype)):
                desc = ",".join(
                    [_describe(s.input), *map(_describe, s.args)]
                    + [f"{k}={_describe(v)}" for k, v in s.kwargs.items()]
                )
                label = OPINFO_FUNCTIONS[name] + (f".{variant}" if variant else "")
                id = f"{label}-{_describe(dtype)}-{i}-{desc}"
                cases.append(pytest.param(name, variant, dtype, i, id=id))
    return cases


@pytest.mark.parametrize(("name", "variant", "dtype", "index"), _opinfo_cases())
def test_opinfo_sample(request: pytest.FixtureRequest, backend: str, name: str, variant: str,
                       dtype: torch.dtype, index: int) -> None:
    sample = opinfo_samples(name, variant, dtype)[index]
    fn_name = OPINFO_FUNCTIONS[name]
    process = sample.output_process_fn_grad

    def call(lib: Any, *args: Any, **kwargs: Any) -> Any:
        return process(getattr(lib, fn_name)(*args, **kwargs))

    # whatever torch does with its own sample (a value, or an exception), crossent does too
    ours, theirs = check_same_exception(
        call,
        sample.input,
        *sample.args,
        backend=backend,
        grad=False,  # keep the requires_grad flags torch's sample set
        # torch's "Casting complex values to real" warning fires once per process
        check_warnings=not dtype.is_complex,
        **sample.kwargs,
    )
    # torch's OpInfos only hold samples that torch accepts
    assert theirs is None and ours is None


# --------------------------------------------------------------------------------------------
# ModuleInfo


@functools.cache
def module_inputs(cls_name: str, dtype: torch.dtype) -> list[Any]:
    info = MODULEINFOS[cls_name]
    return _seeded(
        lambda: info.module_inputs_func(
            info, device="cpu", dtype=dtype, requires_grad=True, training=True
        )
    )


@functools.cache
def module_error_inputs(cls_name: str) -> list[Any]:
    info = MODULEINFOS[cls_name]
    return _seeded(
        lambda: info.module_error_inputs_func(
            info, device="cpu", dtype=torch.float32, requires_grad=False, training=True
        )
    )


def _module_call(cls_name: str) -> Any:
    def call(lib: Any, cargs: tuple, ckwargs: dict, fargs: tuple, fkwargs: dict) -> Any:
        return getattr(lib, cls_name)(*cargs, **ckwargs)(*fargs, **fkwargs)

    return call


def _module_cases() -> list[Any]:
    # the dtypes each ModuleInfo declares (float32 and float64; CrossEntropyLoss adds float16)
    return [
        pytest.param(cls_name, dtype, i, id=f"{cls_name}-{_describe(dtype)}-{i}-{mi.desc or '-'}")
        for cls_name, info in MODULEINFOS.items()
        for dtype in info.dtypes
        for i, mi in enumerate(module_inputs(cls_name, dtype))
    ]


@pytest.mark.parametrize(("cls_name", "dtype", "index"), _module_cases())
def test_module_input(backend: str, cls_name: str, dtype: torch.dtype, index: int) -> None:
    mi = module_inputs(cls_name, dtype)[index]
    c, f = mi.constructor_input, mi.forward_input
    # the flags torch set are kept: logits (and probability targets) require grad, weights not
    check_same(
        _module_call(cls_name), c.args, c.kwargs, f.args, f.kwargs, backend=backend, grad=False
    )


def _module_error_cases() -> list[Any]:
    return [
        pytest.param(cls_name, i, id=f"{cls_name}-{i}-{e.error_type.__name__}")
        for cls_name in MODULEINFOS
        for i, e in enumerate(module_error_inputs(cls_name))
    ]


@pytest.mark.parametrize(("cls_name", "index"), _module_error_cases())
def test_module_error_input(backend: str, cls_name: str, index: int) -> None:
    err = module_error_inputs(cls_name)[index]
    mi = err.module_error_input
    c, f = mi.constructor_input, mi.forward_input
    ours, theirs = check_same_exception(
        _module_call(cls_name), c.args, c.kwargs, f.args, f.kwargs,
        backend=backend, expected=err.error_type, grad=False,
    )
    # torch's own regex for this error matches crossent's message too
    assert re.search(err.error_regex, str(ours)), (err.error_regex, str(ours))
    if err.error_on == ModuleErrorEnum.FORWARD_ERROR:
        # the error belongs to forward: crossent's constructor accepts the same arguments
        module = getattr(crossent.nn, cls_name)(*c.args, **c.kwargs, backend=backend)
        assert isinstance(module, getattr(torch.nn, cls_name))


# --------------------------------------------------------------------------------------------
# gradients as torch's test_ops_gradients.py and test_modules.py check them: gradcheck and
# gradgradcheck, with batched gradients and forward-mode AD, on float64 samples


def _differentiable(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad


def _gradient_checks(fn: Any, torch_fn: Any, tensors: list[torch.Tensor]) -> None:
    """crossent passes the checks; or, on the rare sample where torch's own function fails
    them (a 0/0 loss: all targets ignored under 'mean'), fails them too. torch's own checks
    run only where its output is not finite (where they can fail): elsewhere they would only
    double the time."""
    kw = {"check_batched_grad": True}

    def checks(f: Any) -> None:
        assert torch.autograd.gradcheck(f, tensors, check_forward_ad=True, **kw)
        assert torch.autograd.gradgradcheck(f, tensors, **kw)

    with torch.no_grad():
        out = torch_fn(*tensors)
    finite = all(o.isfinite().all() for o in (out if isinstance(out, tuple) else (out,)))
    if not finite:
        try:
            checks(torch_fn)
        except GradcheckError:
            with pytest.raises(GradcheckError):
                checks(fn)
            return
    checks(fn)


def _grad_cases() -> list[Any]:
    cases = []
    for name, variant in OPINFOS:
        for i, s in enumerate(opinfo_samples(name, variant, torch.float64)):
            if _differentiable(s.input):
                label = OPINFO_FUNCTIONS[name] + (f".{variant}" if variant else "")
                cases.append(pytest.param(name, variant, i, id=f"{label}-{i}"))
    return cases


@pytest.mark.parametrize(("name", "variant", "index"), _grad_cases())
def test_opinfo_gradients(backend: str, name: str, variant: str, index: int) -> None:
    sample = opinfo_samples(name, variant, torch.float64)[index]
    args = [sample.input, *sample.args]
    where = [i for i, a in enumerate(args) if _differentiable(a)]

    def caller(fn: Any, **extra: Any) -> Any:
        def call(*diff: torch.Tensor) -> Any:
            full = list(args)
            for i, d in zip(where, diff, strict=True):
                full[i] = d
            return sample.output_process_fn_grad(fn(*full, **sample.kwargs, **extra))

        return call

    fn_name = OPINFO_FUNCTIONS[name]
    ours = caller(getattr(crossent, fn_name), backend=backend)
    theirs = caller(getattr(torch.nn.functional, fn_name))
    _gradient_checks(ours, theirs, [args[i].detach().clone().requires_grad_() for i in where])


@pytest.mark.parametrize(
    ("cls_name", "index"),
    [pytest.param(c, i, id=f"{c}-{i}-{mi.desc or '-'}")
     for c in MODULEINFOS for i, mi in enumerate(module_inputs(c, torch.float64))],
)  # fmt: skip
def test_module_gradients(cls_name: str, index: int) -> None:
    # the fused CPU backend ("auto"'s on CPU); test_opinfo_gradients and test_transforms.py
    # run the checks on every backend
    backend = "cpu"
    mi = module_inputs(cls_name, torch.float64)[index]
    c, f = mi.constructor_input, mi.forward_input
    args = list(f.args)
    where = [i for i, a in enumerate(args) if _differentiable(a)]

    def caller(module: Any) -> Any:
        def call(*diff: torch.Tensor) -> Any:
            full = list(args)
            for i, d in zip(where, diff, strict=True):
                full[i] = d
            return module(*full, **f.kwargs)

        return call

    ours = caller(getattr(crossent.nn, cls_name)(*c.args, **c.kwargs, backend=backend))
    theirs = caller(getattr(torch.nn, cls_name)(*c.args, **c.kwargs))
    _gradient_checks(ours, theirs, [args[i].detach().clone().requires_grad_() for i in where])
