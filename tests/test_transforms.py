"""crossent under torch's program transforms, against what torch itself gives.

- ``torch.compile(fullgraph=True)``: no graph break for any public function or module,
  forward and backward, and compiled results equal eager ones bit for bit (the kernels run as
  custom operators); ``torch.library.opcheck`` on every operator (schema, fake
  implementation, autograd registration, AOT dispatch).
- torch.func: ``vmap``, ``grad``, ``jacrev``, ``jacfwd``, ``jvp`` and forward-mode AD give
  torch's values.
- ``gradcheck`` / ``gradgradcheck`` with batched-gradient and forward-AD checks, on every
  backend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import grad, jacfwd, jacrev, jvp, vmap

import crossent
import crossent.nn
from crossent import testing

M, V, D = 12, 40, 8


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    # each test compiles its own functions: no cache limit reached, no graph reused
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(
    dtype: torch.dtype = torch.float32, m: int = M, v: int = V, d: int = D
) -> dict[str, torch.Tensor]:
    return {
        "x": testing.make_logits((m, v), dtype=dtype),
        "t": testing.make_targets((m,), v, ignore_index=-100, ignore_fraction=0.2),
        "p": testing.make_probs((m, v), dtype=dtype, seed=3),
        "w": testing.make_weight(v, dtype=dtype, seed=4),
        "h": testing.make_logits((m, d), dtype=dtype, seed=5),
        "lw": testing.make_logits((v, d), dtype=dtype, seed=6) / 3,
        "lb": testing.make_logits((v,), dtype=dtype, seed=7),
        "x3": testing.make_logits((2, v, 3), dtype=dtype, seed=8),
        "t3": testing.make_targets((2, 3), v, seed=9),
    }


# name -> (function of (backend, tensors) -> output, names of the tensors that require grad)
CALLS: dict[str, tuple[Callable[..., Any], tuple[str, ...]]] = {
    "cross_entropy": (
        lambda b, a: crossent.cross_entropy(a["x"], a["t"], a["w"], label_smoothing=0.1,
                                            backend=b), ("x",)),  # fmt: skip
    "cross_entropy_none_ext": (
        lambda b, a: crossent.cross_entropy(a["x"], a["t"], reduction="none", z_loss=1e-2,
                                            softcap=5.0, temperature=0.7, backend=b),
        ("x",)),  # fmt: skip
    "cross_entropy_kdim": (
        lambda b, a: crossent.cross_entropy(a["x3"], a["t3"], reduction="sum", backend=b),
        ("x3",)),  # fmt: skip
    "cross_entropy_prob": (
        lambda b, a: crossent.cross_entropy(a["x"], a["p"], a["w"], label_smoothing=0.2,
                                            backend=b), ("x", "p", "w")),  # fmt: skip
    "nll_loss": (lambda b, a: crossent.nll_loss(a["x"], a["t"], a["w"], backend=b), ("x",)),
    "softmax": (lambda b, a: crossent.softmax(a["x"], 1, backend=b), ("x",)),
    "log_softmax": (lambda b, a: crossent.log_softmax(a["x3"], 1, backend=b), ("x3",)),
    "linear_cross_entropy": (
        lambda b, a: crossent.linear_cross_entropy(a["h"], a["lw"], a["t"], linear_bias=a["lb"],
                                                   label_smoothing=0.1, backend=b),
        ("h", "lw", "lb")),  # fmt: skip
    "linear_cross_entropy_none": (
        lambda b, a: crossent.linear_cross_entropy(a["h"], a["lw"], a["t"], reduction="none",
                                                   z_loss=1e-3, backend=b),
        ("h", "lw")),  # fmt: skip
    "linear_cross_entropy_prob": (
        lambda b, a: crossent.linear_cross_entropy(a["h"], a["lw"], a["p"], backend=b),
        ("h", "lw")),  # fmt: skip
    "token_stats": (
        lambda b, a: crossent.token_stats(a["x"], a["t"], temperature=0.8)[:2], ("x",)),
    "linear_token_stats": (
        lambda b, a: crossent.linear_token_stats(a["h"], a["lw"], a["t"], linear_bias=a["lb"])[:2],
        ("h", "lw", "lb")),  # fmt: skip
}
MODULES: dict[str, tuple[Callable[[str], torch.nn.Module], tuple[str, ...], tuple[str, ...]]] = {
    "CrossEntropyLoss": (lambda b: crossent.nn.CrossEntropyLoss(label_smoothing=0.1, backend=b),
                         ("x", "t"), ("x",)),  # fmt: skip
    "NLLLoss": (lambda b: crossent.nn.NLLLoss(reduction="sum", backend=b), ("x", "t"), ("x",)),
    "Softmax": (lambda b: crossent.nn.Softmax(1, backend=b), ("x",), ("x",)),
    "LogSoftmax": (lambda b: crossent.nn.LogSoftmax(-1, backend=b), ("x",), ("x",)),
    "LinearCrossEntropyLoss": (
        lambda b: crossent.nn.LinearCrossEntropyLoss(D, V, backend=b), ("h", "t"), ("h",)),
}


def _outputs(out: Any) -> tuple[torch.Tensor, ...]:
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)


def _forward_backward(
    fn: Callable[[dict[str, torch.Tensor]], Any], tensors: dict[str, torch.Tensor],
    wanted: tuple[str, ...], params: tuple[torch.nn.Parameter, ...] = (),
) -> list[torch.Tensor]:  # fmt: skip
    """Outputs, then the gradients of ``wanted`` and ``params`` after a seeded backward."""
    a = {k: v.detach().clone().requires_grad_(k in wanted) for k, v in tensors.items()}
    outs = _outputs(fn(a))
    gen = torch.Generator().manual_seed(11)
    total = sum(
        (o.float() * torch.rand(o.shape, generator=gen)).sum()
        for o in outs if o.is_floating_point()
    )  # fmt: skip
    total.backward()
    grads = [a[k].grad for k in wanted] + [p.grad for p in params]
    assert all(g is not None for g in grads)
    return [o.detach() for o in outs] + grads  # type: ignore[misc]


def _assert_identical(eager: list[torch.Tensor], compiled: list[torch.Tensor]) -> None:
    assert len(eager) == len(compiled)
    for e, c in zip(eager, compiled, strict=True):
        assert e.dtype == c.dtype and e.shape == c.shape
        assert torch.equal(e, c) or torch.equal(e.isnan(), c.isnan()) and torch.equal(
            e.nan_to_num(), c.nan_to_num()
        ), (e - c).abs().max()


# ---- torch.compile ---------------------------------------------------------------------------


def _no_graph_breaks(fn: Callable[..., Any], *args: Any) -> None:
    explanation = torch._dynamo.explain(fn)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("name", list(CALLS))
def test_compiled_function_equals_eager(backend: str, name: str) -> None:
    call, wanted = CALLS[name]
    tensors = _inputs()

    def fn(a: dict[str, torch.Tensor]) -> Any:
        return call(backend, a)

    # Inductor on the fused backend, the one "auto" picks on CPU; AOT autograd without code
    # generation on the others (the graphs are the same, only the compile time differs)
    compiler = "inductor" if backend == "cpu" else "aot_eager"
    eager = _forward_backward(fn, tensors, wanted)
    compiled = _forward_backward(
        torch.compile(fn, fullgraph=True, backend=compiler), tensors, wanted
    )
    _assert_identical(eager, compiled)
    a = {k: v.detach().clone().requires_grad_(k in wanted) for k, v in tensors.items()}
    _no_graph_breaks(fn, a)


@pytest.mark.parametrize("name", list(MODULES))
def test_compiled_module_equals_eager(name: str) -> None:
    make, args, wanted = MODULES[name]
    tensors = _inputs()
    torch.manual_seed(0)
    eager_mod = make("cpu")
    compiled_mod = make("cpu")
    compiled_mod.load_state_dict(eager_mod.state_dict())
    params_e = tuple(eager_mod.parameters())
    params_c = tuple(compiled_mod.parameters())
    compiled = torch.compile(compiled_mod, fullgraph=True)
    eager = _forward_backward(lambda a: eager_mod(*(a[k] for k in args)), tensors, wanted, params_e)
    got = _forward_backward(lambda a: compiled(*(a[k] for k in args)), tensors, wanted, params_c)
    _assert_identical(eager, got)
    _no_graph_breaks(make("cpu"), *(tensors[k].requires_grad_(k in wanted) for k in args))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_half_precision_equals_eager(dtype: torch.dtype) -> None:
    tensors = _inputs(dtype)

    def fn(a: dict[str, torch.Tensor]) -> Any:
        ce = crossent.cross_entropy(a["x"], a["t"], backend="cpu")
        lin = crossent.linear_cross_entropy(a["h"], a["lw"], a["t"], backend="cpu")
        return ce, lin

    eager = _forward_backward(fn, tensors, ("x", "h", "lw"))
    compiled = _forward_backward(torch.compile(fn, fullgraph=True), tensors, ("x", "h", "lw"))
    _assert_identical(eager, compiled)


def test_compiled_under_autocast_equals_eager() -> None:
    tensors = _inputs()

    def fn(a: dict[str, torch.Tensor]) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = a["h"] @ a["lw"].t()
            ce = crossent.cross_entropy(logits, a["t"], backend="cpu")
            return ce, crossent.linear_cross_entropy(a["h"], a["lw"], a["t"], backend="cpu")

    eager = _forward_backward(fn, tensors, ("h", "lw"))
    compiled = _forward_backward(
        torch.compile(fn, fullgraph=True, backend="aot_eager"), tensors, ("h", "lw")
    )
    _assert_identical(eager, compiled)


def test_compiled_training_step_matches_eager() -> None:
    # a small classifier trained for a few steps, compiled as a whole (model, loss, backward)
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    y = torch.randint(0, 300, (64,))
    def train(compile_it: bool) -> torch.Tensor:
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(),
                                    torch.nn.Linear(32, 300))  # fmt: skip
        opt = torch.optim.SGD(model.parameters(), lr=0.5)

        def step() -> torch.Tensor:
            opt.zero_grad()
            loss = crossent.cross_entropy(model(x), y, backend="cpu")
            loss.backward()
            opt.step()
            return loss

        run = torch.compile(step) if compile_it else step
        return torch.stack([run().detach() for _ in range(4)])

    losses = [train(False), train(True)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    assert losses[0][-1] < losses[0][0]


def test_compiled_call_checks_its_targets() -> None:
    # the range check reads the targets: it runs inside the operator, when the graph runs
    x = testing.make_logits((4, 10), requires_grad=True)
    bad = torch.tensor([1, 2, 10, 3])
    f = torch.compile(lambda x, t: crossent.cross_entropy(x, t, backend="cpu"), fullgraph=True)
    with pytest.raises(IndexError, match="Target 10 is out of bounds"):
        f(x, bad)
    g = torch.compile(lambda x, t: crossent.nll_loss(x, t, backend="cpu"), fullgraph=True)
    with pytest.raises(IndexError, match="Target -3 is out of bounds"):
        g(x, torch.tensor([0, -3, 1, 1]))


def _op_samples() -> dict[str, list[tuple[Any, ...]]]:
    a = _inputs()
    x, t, p, w, h, lw, lb = (a[k] for k in ("x", "t", "p", "w", "h", "lw", "lb"))
    xg = x.clone().requires_grad_()
    row = (-100, 0.1, 0.0, None, 1.0)
    ext = (-100, 0.0, 1e-2, 4.0, 0.8)
    lin = (16, torch.float32, None)
    lin_ac = (16, torch.float32, torch.bfloat16)
    hg, lwg, lbg = (v.clone().requires_grad_() for v in (h, lw, lb))
    g = torch.rand(M)
    return {
        "cross_entropy": [
            (xg, t, w, "cpu", "mean", *row, False, True),
            (xg, t, None, "cpu", "none", *ext, False, True),
            (xg, p.clone().requires_grad_(), w, "cpu", "sum", *row[:1], 0.2, 0.0, None, 1.0,
             True, True),  # fmt: skip
            (x, t, None, "torch", "mean", *row, False, False),
        ],
        "cross_entropy_prob_grads": [
            (x, p, w, torch.zeros(M), torch.tensor(0.5), "cpu", "mean", 0.1, 0.0, None, 1.0,
             True, True)],  # fmt: skip
        "nll_loss": [(xg, t, w, "cpu", "mean", -100), (xg, t, None, "cpu", "none", -100)],
        "nll_loss_backward": [
            (torch.tensor(2.0), t, w, torch.tensor(3.0, dtype=torch.float64), "cpu", "mean",
             -100, V, torch.float32)],  # fmt: skip
        "softmax": [(xg, "cpu", False), (xg, "cpu", True)],
        "softmax_backward": [(torch.rand(M, V), torch.softmax(x, 1), "cpu", False)],
        "linear_cross_entropy": [
            (hg, lwg, lbg, t, None, None, "cpu", "mean", *row, *lin, True, True, True),
            (hg, lwg, None, t, w, None, "cpu", "none", *ext, *lin, True, True, False),
            (hg, lwg, lbg, t, None, None, "cpu", "sum", *row, *lin_ac, True, True, True),
            (hg, lwg, lbg, t, None, torch.tensor(7.0, dtype=torch.float64), "cpu", "sum", *row,
             *lin, True, True, True),  # fmt: skip
        ],
        "linear_cross_entropy_backward": [
            (h, lw, lb, t, None, g, "cpu", "none", *row, *lin, True, True, True)],
        "token_stats": [(xg, t, "cpu", -100, None, 1.0, 8), (xg, t, "torch", -100, 3.0, 0.5, 0)],
        "token_stats_backward": [
            (x, t, torch.rand(M), torch.rand(M), "cpu", -100, None, 1.0, 8),
            (x, t, torch.rand(M), torch.rand(M), "torch", -100, 2.0, 1.0, 3)],  # fmt: skip
        "linear_token_stats": [(hg, lwg, lbg, t, "cpu", -100, None, 0.9, 5)],
        "linear_token_stats_backward": [
            (h, lw, None, t, torch.rand(M), torch.rand(M), "cpu", -100, None, 1.0, 5, True, True,
             False)],  # fmt: skip
    }


@pytest.mark.parametrize("op", list(_op_samples()))
def test_custom_operator_opcheck(op: str) -> None:
    for args in _op_samples()[op]:
        torch.library.opcheck(getattr(torch.ops.crossent, op), args)


# ---- torch.func ------------------------------------------------------------------------------

# name -> (crossent, torch) functions of (x, t) on one (M, V) sample, returning a scalar
FUNC_PAIRS: dict[str, tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]] = {
    "cross_entropy": (
        lambda x, t, b: crossent.cross_entropy(x, t, label_smoothing=0.1, backend=b),
        lambda x, t: F.cross_entropy(x, t, label_smoothing=0.1)),  # fmt: skip
    "cross_entropy_ext": (
        lambda x, t, b: crossent.cross_entropy(x, t, z_loss=0.1, softcap=3.0, backend=b),
        lambda x, t: F.cross_entropy(3.0 * torch.tanh(x / 3.0), t)
        + 0.1 * torch.where(t != -100, torch.logsumexp(3.0 * torch.tanh(x / 3.0), 1), 0.0)
        .pow(2).sum() / (t != -100).sum()),  # fmt: skip
    "nll_loss": (lambda x, t, b: crossent.nll_loss(x, t, reduction="sum", backend=b),
                 lambda x, t: F.nll_loss(x, t, reduction="sum")),  # fmt: skip
    "log_softmax": (lambda x, t, b: crossent.log_softmax(x, 1, backend=b).pow(2).sum(),
                    lambda x, t: F.log_softmax(x, 1).pow(2).sum()),  # fmt: skip
    "softmax": (lambda x, t, b: crossent.softmax(x, 1, backend=b).pow(2).sum(),
                lambda x, t: F.softmax(x, 1).pow(2).sum()),  # fmt: skip
    "token_stats": (
        lambda x, t, b: crossent.token_stats(x, t).logprob.sum()
        + crossent.token_stats(x, t).entropy.sum(),
        lambda x, t: torch.where(
            t != -100, F.log_softmax(x, 1).gather(1, t.clamp(min=0)[:, None])[:, 0], 0.0
        ).sum() - (F.softmax(x, 1) * F.log_softmax(x, 1)).sum()),  # fmt: skip
}


@pytest.mark.parametrize("name", list(FUNC_PAIRS))
def test_torch_func_transforms_match_torch(backend: str, name: str) -> None:
    ours, theirs = FUNC_PAIRS[name]
    x = testing.make_logits((3, 5, 7), dtype=torch.float64)
    t = testing.make_targets((3, 5), 7, ignore_index=-100, ignore_fraction=0.2)

    def f(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ours(x, t, backend)

    close = torch.testing.assert_close
    close(vmap(f)(x, t), vmap(theirs)(x, t))
    close(vmap(grad(f))(x, t), vmap(grad(theirs))(x, t))
    close(jacrev(f)(x[0], t[0]), jacrev(theirs)(x[0], t[0]))
    close(jacfwd(f)(x[0], t[0]), jacfwd(theirs)(x[0], t[0]))
    close(jacfwd(jacrev(f))(x[0], t[0]), jacfwd(jacrev(theirs))(x[0], t[0]))
    v = torch.rand_like(x[0])
    expected = jvp(lambda a: theirs(a, t[0]), (x[0],), (v,))
    close(jvp(lambda a: f(a, t[0]), (x[0],), (v,)), expected)
    with fwAD.dual_level():
        out = f(fwAD.make_dual(x[0], v), t[0])
        close(fwAD.unpack_dual(out).tangent, expected[1])


def test_per_sample_gradients_of_a_linear_head(backend: str) -> None:
    # Opacus-style per-sample gradients: vmap(grad) over the samples of a batch
    h = testing.make_logits((6, D), dtype=torch.float64)
    lw = testing.make_logits((V, D), dtype=torch.float64, seed=2)
    t = testing.make_targets((6,), V)

    def loss(w: torch.Tensor, hh: torch.Tensor, tt: torch.Tensor, lib: Any) -> torch.Tensor:
        kw = {"backend": backend} if lib is crossent else {}
        return lib.linear_cross_entropy(hh[None], w, tt[None], **kw)

    ours = vmap(grad(loss), in_dims=(None, 0, 0, None))(lw, h, t, crossent)
    theirs = vmap(grad(loss), in_dims=(None, 0, 0, None))(lw, h, t, F)
    torch.testing.assert_close(ours, theirs)


def test_inplace_backward_under_a_transform_raises() -> None:
    x = testing.make_logits((4, 6), dtype=torch.float64)
    t = testing.make_targets((4,), 6)
    with pytest.raises(RuntimeError, match="inplace_backward=True cannot be used under"):
        grad(lambda a: crossent.cross_entropy(a * 1, t, inplace_backward=True))(x)


# ---- gradcheck / gradgradcheck ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(CALLS))
def test_gradcheck_and_gradgradcheck(backend: str, name: str) -> None:
    call, wanted = CALLS[name]
    # small: gradcheck runs the function twice per input element (Triton's interpreter and
    # the float64 reference are slow)
    tensors = _inputs(torch.float64, m=4, v=6, d=3)
    names = list(wanted)

    def fn(*args: torch.Tensor) -> Any:
        a = dict(tensors)
        a.update(zip(names, args, strict=True))
        out = call(backend, a)
        return out if isinstance(out, torch.Tensor) else tuple(out)

    args = tuple(tensors[k].detach().clone().requires_grad_() for k in names)
    kw = {"check_batched_grad": True}
    assert torch.autograd.gradcheck(fn, args, check_forward_ad=True, **kw)
    assert torch.autograd.gradgradcheck(fn, args, **kw)


def test_logits_modified_in_place_after_the_loss() -> None:
    # torch's cross entropy saves its log-probabilities, so changing the logits afterwards
    # leaves a first-order backward valid; crossent's does too. A second derivative, which
    # needs the logits, then raises torch's error instead of using the new values.
    x = testing.make_logits((5, 9), requires_grad=True)
    t = testing.make_targets((5,), 9)
    def first_order(lib: Any) -> torch.Tensor:
        logits = x * 2
        kw = {"backend": "cpu"} if lib is crossent else {}
        loss = lib.cross_entropy(logits, t, **kw)
        logits.add_(1.0)
        return torch.autograd.grad(loss, x)[0]

    grads = [first_order(crossent), first_order(F)]
    torch.testing.assert_close(grads[0], grads[1])
    logits = x * 2
    loss = crossent.cross_entropy(logits, t, backend="cpu")
    logits.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, x, create_graph=True)
