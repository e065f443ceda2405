"""``linear_cross_entropy``: torch's results (values, and gradients of the input, the linear
weight and the bias) on every option, through the chunked path; torch's errors; the module."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from parity import check_same, check_same_exception

import crossent
import crossent.nn
from crossent import testing

N, D, V = 29, 12, 41
KW = inspect.Parameter.KEYWORD_ONLY


def lce(lib: Any, *args: Any, chunk_bytes: int | None = None, **kwargs: Any) -> Any:
    """``linear_cross_entropy`` through either library; crossent also gets ``chunk_bytes``."""
    if lib.name != "torch":
        kwargs["chunk_bytes"] = chunk_bytes
    return lib.linear_cross_entropy(*args, **kwargs)


def hidden(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return testing.make_logits(shape, dtype, seed)


def problem(dtype: torch.dtype, bias: bool, seed: int = 0) -> tuple[torch.Tensor, ...]:
    x = hidden(N, D, dtype=dtype, seed=seed)
    w = (hidden(V, D, dtype=torch.float64, seed=seed + 1) / D**0.5).to(dtype)
    b = hidden(V, dtype=dtype, seed=seed + 2) if bias else None
    return x, w, b


def index_targets(ignore: int | None, seed: int = 0) -> torch.Tensor:
    t = testing.make_targets((N,), V, seed)
    if ignore is not None:
        t[::4] = ignore
    return t


# Four rows of logits per chunk: 8 chunks, the last one ragged.
FOUR_ROWS = 4 * V * 4


def check_half(
    backend: str, x: torch.Tensor, w: torch.Tensor, t: torch.Tensor, chunk_bytes: int,
    **kw: Any,
) -> None:
    """bfloat16: crossent against an oracle that is exact *for the operation torch defines*.

    torch's linear_cross_entropy rounds the logits to the input dtype (``linear`` in
    bfloat16); both libraries then compute from those logits, so a float64 evaluation of the
    unrounded logits measures mostly that shared rounding, and comparing two maxima of it is
    a coin toss. The oracle here takes torch's bfloat16 logits and computes the loss and the
    gradients from them in float64; crossent must be within the tolerance rule of it, with
    torch's own error (same inputs, same incoming gradient) as the reference.
    """
    b = kw.pop("linear_bias", None)
    g = torch.Generator().manual_seed(5)
    go = None
    results = []
    for lib in ("crossent", "torch"):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        bs = None if b is None else b.detach().clone().requires_grad_()
        if lib == "torch":
            out = F.linear_cross_entropy(xs, ws, t, linear_bias=bs, **kw)
        else:
            out = crossent.linear_cross_entropy(xs, ws, t, linear_bias=bs, backend=backend,
                                                chunk_bytes=chunk_bytes, **kw)
        if go is None:
            go = (torch.randn(out.shape, generator=g) * 0.5 + 1).to(out.dtype)
        out.backward(go)
        results.append([out, xs.grad, ws.grad] + ([] if bs is None else [bs.grad]))
    logits = F.linear(x, w, None if b is None else b.detach()).double().requires_grad_()
    ckw = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    ckw = {k: v for k, v in ckw.items() if k != "options"}
    tt = t.double() if t.is_floating_point() else t
    if ckw.get("ignore_index") is None:
        ckw.pop("ignore_index", None)
    loss = F.cross_entropy(logits, tt, **ckw)
    loss.backward(go.double())  # type: ignore[union-attr]
    gl = logits.grad
    oracle = [loss.detach(), gl @ w.double(), gl.t() @ x.double()]
    if b is not None:
        oracle.append(gl.sum(0))
    names = ["loss", "d input", "d linear_weight", "d linear_bias"]
    for ours, theirs, exact, what in zip(*results, oracle, names, strict=False):
        testing.assert_close_to_oracle(ours, exact, theirs, what=what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore", [None, -100, 3], ids=["all", "ignored", "ignore3"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("weighted", [False, True], ids=["", "weight"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_index_targets_match_torch(
    backend: str, dtype: torch.dtype, reduction: str, ignore: int | None, bias: bool,
    weighted: bool, smoothing: float,
) -> None:
    x, w, b = problem(dtype, bias)
    kw: dict[str, Any] = {"reduction": reduction, "label_smoothing": smoothing}
    if ignore is not None:
        kw["ignore_index"] = ignore
    if weighted:
        kw["weight"] = testing.make_weight(V, dtype)
    t = index_targets(ignore)
    if b is not None:
        kw["linear_bias"] = b.requires_grad_()
    chunk = FOUR_ROWS * dtype.itemsize // 4
    if dtype == torch.bfloat16:
        check_half(backend, x, w, t, chunk, **kw)
    else:
        check_same(lce, x, w, t, backend=backend, chunk_bytes=chunk, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("weighted", [False, True], ids=["", "weight"])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_probability_targets_match_torch(
    backend: str, dtype: torch.dtype, reduction: str, bias: bool, weighted: bool,
    smoothing: float,
) -> None:
    x, w, b = problem(dtype, bias)
    kw: dict[str, Any] = {"reduction": reduction, "label_smoothing": smoothing}
    if weighted:
        kw["weight"] = testing.make_weight(V, dtype)
    if b is not None:
        kw["linear_bias"] = b.requires_grad_()
    t = testing.make_probs((N, V), dtype)
    if dtype == torch.bfloat16:
        check_half(backend, x, w, t, FOUR_ROWS // 2, **kw)
        return
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    check_same(lce, xr, wr, t, backend=backend, grad=False, chunk_bytes=FOUR_ROWS, **kw)


@pytest.mark.parametrize("chunk_bytes", [1, 7 * V * 4, None], ids=["row", "seven", "default"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_any_chunking_gives_torchs_result(
    backend: str, chunk_bytes: int | None, reduction: str
) -> None:
    x, w, b = problem(torch.float32, True)
    check_same(lce, x, w, index_targets(-100), linear_bias=b.requires_grad_(),  # type: ignore[union-attr]
               reduction=reduction, chunk_bytes=chunk_bytes, backend=backend)


@pytest.mark.parametrize(
    "kw",
    [{"label_smoothing": 0.1}, {"reduction": "sum", "label_smoothing": 0.2}],
    ids=["smoothing", "sum-smoothing"],
)
def test_options_it_cannot_use_warn_as_in_torch(backend: str, kw: dict[str, Any]) -> None:
    # check_same compares the warnings (category and text) too
    x, w, b = problem(torch.float32, True)
    opts = torch.nn.LinearCrossEntropyOptions()
    check_same(lce, x, w, index_targets(None), linear_bias=b.requires_grad_(),  # type: ignore[union-attr]
               options=opts, backend=backend, **kw)


def test_options_batch_chunk_size_sets_the_rows_per_chunk(backend: str) -> None:
    x, w, _ = problem(torch.float32, False)
    opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=5, chunking_method=None)
    check_same(lce, x, w, index_targets(None), options=opts, backend=backend)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_unbatched_input(backend: str, reduction: str) -> None:
    x, w, b = problem(torch.float32, True)
    check_same(lce, x[0], w, torch.tensor(5), linear_bias=b.requires_grad_(),  # type: ignore[union-attr]
               reduction=reduction, backend=backend)
    p = testing.make_probs((V,))
    xr, wr = x[0].clone().requires_grad_(), w.clone().requires_grad_()
    check_same(lce, xr, wr, p, reduction=reduction, backend=backend, grad=False)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_row_ignored_and_no_rows(backend: str, reduction: str) -> None:
    x, w, _ = problem(torch.float32, False)
    check_same(lce, x, w, torch.full((N,), -100), reduction=reduction, backend=backend)
    check_same(lce, x[:0], w, torch.zeros(0, dtype=torch.int64), reduction=reduction,
               backend=backend)


def test_k_dimensional_loss_and_differentiable_targets(backend: str) -> None:
    # computed through materialised logits, as torch's reference path
    x = hidden(6, D)
    w = hidden(V, 3, D) / D**0.5
    t = testing.make_targets((6, 3), V)
    check_same(lce, x, w, t, linear_bias=hidden(V, 3).requires_grad_(), backend=backend)
    p = testing.make_probs((N, V)).requires_grad_()
    xr, wr, _ = problem(torch.float32, False)
    check_same(lce, xr.requires_grad_(), wr.requires_grad_(), p, backend=backend, grad=False)


def test_retain_graph_second_backward(backend: str) -> None:
    x, w, b = problem(torch.float32, True)
    for reduction in ("mean", "none"):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = crossent.linear_cross_entropy(
            xs, ws, index_targets(-100), reduction=reduction, backend=backend
        ).sum()
        loss.backward(retain_graph=True)
        first = (xs.grad.clone(), ws.grad.clone())  # type: ignore[union-attr]
        loss.backward()
        assert torch.allclose(xs.grad, 2 * first[0]) and torch.allclose(ws.grad, 2 * first[1])  # type: ignore[arg-type]


def test_only_the_inputs_that_require_grad_get_one(backend: str) -> None:
    x, w, b = problem(torch.float32, True)
    wr = w.clone().requires_grad_()
    loss = crossent.linear_cross_entropy(x, wr, index_targets(None), linear_bias=b,
                                         backend=backend)
    loss.backward()
    assert x.grad is None and b.grad is None and wr.grad is not None  # type: ignore[union-attr]
    with torch.no_grad():
        out = crossent.linear_cross_entropy(x, wr, index_targets(None), backend=backend)
    assert not out.requires_grad


def T(*v: Any) -> torch.Tensor:
    return torch.tensor(v)


X, W = hidden(4, D), hidden(V, D)
ERRORS = [
    pytest.param((hidden(2, 4, D), W, T(0, 1)), {}, id="3d-input"),
    pytest.param((hidden(D), hidden(D), T(0)), {}, id="1d-weight"),
    pytest.param((X, hidden(V, D + 1), T(0, 1, 2, 3)), {}, id="in-features"),
    pytest.param((X, W, T(0, 1, 2, 3)), {"linear_bias": hidden(V + 1)}, id="bias-shape"),
    pytest.param((hidden(D), hidden(V, 2, D), T(0, 1)), {}, id="k-dim-unbatched"),
    pytest.param((X, W, testing.make_probs((4, V))), {"ignore_index": -100}, id="prob-ignore"),
    pytest.param((X, W, T(0, 1, V, 3)), {}, id="target-out-of-range"),
    pytest.param((X, W, T(0, 1, -5, 3)), {}, id="negative-target"),
    pytest.param((X, W, T(0, 1, 2)), {}, id="batch-mismatch"),
    pytest.param((X, W.double(), T(0, 1, 2, 3)), {}, id="weight-dtype"),
    pytest.param((X, W, T(0, 1, 2, 3)), {"reduction": "avg"}, id="reduction"),
    pytest.param((X, W, T(0, 1, 2, 3)), {"label_smoothing": 1.5}, id="smoothing"),
    pytest.param((X, W, T(0, 1, 2, 3)), {"weight": torch.ones(V + 2)}, id="class-weight-shape"),
    pytest.param((X, W, T(0, 1, 2, 3).float()), {}, id="float-index-target"),
    pytest.param((X, W, T(0, 1, 2, 3)), {"ignore_index": 3.5}, id="float-ignore-index"),
]


@pytest.mark.parametrize(("args", "kwargs"), ERRORS)
def test_bad_input_raises_torchs_error(backend: str, args: tuple, kwargs: dict) -> None:
    ours, theirs = check_same_exception(lce, *args, backend=backend, **kwargs)
    assert theirs is not None


# ---- signature, docs, module ---------------------------------------------------------------


def test_signature_is_torchs_plus_extras() -> None:
    ours = list(inspect.signature(crossent.linear_cross_entropy).parameters.values())
    theirs = list(inspect.signature(F.linear_cross_entropy).parameters.values())
    spec = [(p.name, p.kind, p.default) for p in ours]
    assert spec[: len(theirs)] == [(p.name, p.kind, p.default) for p in theirs]
    assert spec[len(theirs):] == [
        ("backend", KW, "auto"), ("chunk_bytes", KW, None), ("z_loss", KW, 0.0),
        ("softcap", KW, None), ("temperature", KW, 1.0), ("logits_dtype", KW, None),
        ("divisor", KW, None),
    ]
    m_ours = list(inspect.signature(crossent.nn.LinearCrossEntropyLoss.__init__).parameters)
    m_theirs = list(inspect.signature(torch.nn.LinearCrossEntropyLoss.__init__).parameters)
    assert m_ours == [*m_theirs, "backend", "chunk_bytes"]


def test_docs_name_every_parameter() -> None:
    module, fn_ = crossent.nn.LinearCrossEntropyLoss, crossent.linear_cross_entropy
    for fn, params in (
        (fn_, inspect.signature(fn_).parameters),
        (module, inspect.signature(module.__init__).parameters),
    ):
        missing = [p for p in params if p != "self" and p not in (fn.__doc__ or "")]
        assert missing == []


@pytest.mark.parametrize("bias", [False, True])
def test_module_matches_torchs(backend: str, bias: bool) -> None:
    torch.manual_seed(0)
    theirs = torch.nn.LinearCrossEntropyLoss(D, V, bias=bias, weight=testing.make_weight(V),
                                             label_smoothing=0.1)
    torch.manual_seed(0)
    ours = crossent.nn.LinearCrossEntropyLoss(D, V, bias=bias, weight=testing.make_weight(V),
                                              label_smoothing=0.1, backend=backend,
                                              chunk_bytes=FOUR_ROWS)
    assert isinstance(ours, torch.nn.LinearCrossEntropyLoss)
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x, t = hidden(N, D), index_targets(-100)
    results = []
    for m in (ours, theirs):
        xs = x.clone().requires_grad_()
        loss = m(xs, t)
        loss.backward()
        results.append((loss, xs.grad, m.linear.weight.grad))
    for a, b_ in zip(*results, strict=True):
        testing.assert_close_to_oracle(a, b_, dtype=torch.float32)
    assert crossent.LinearCrossEntropyLoss is crossent.nn.LinearCrossEntropyLoss


# torch builds before 2.13 have no torch.nn.LinearCrossEntropyLoss; crossent's module then
# builds on its own base, which must hold what torch's does: same parameters (same
# initialisation under one seed), buffers, constants, repr, and the same errors for a badly
# shaped weight and an out-of-range smoothing.
@pytest.mark.parametrize("kw", [{}, {"bias": True, "out_features": (2,), "label_smoothing": 0.3}])
def test_fallback_module_base_holds_what_torchs_does(kw: dict[str, Any]) -> None:
    from crossent.nn import _LinearCrossEntropyModule

    args = (D, V)
    torch.manual_seed(0)
    theirs = torch.nn.LinearCrossEntropyLoss(*args, weight=testing.make_weight(V), **kw)
    torch.manual_seed(0)
    ours = _LinearCrossEntropyModule(*args, weight=testing.make_weight(V), **kw)
    assert repr(ours).replace(type(ours).__name__, "M") == repr(theirs).replace(
        type(theirs).__name__, "M"
    )
    assert ours.__constants__ == theirs.__constants__
    for (ka, a), (kb, b_) in zip(
        ours.state_dict().items(), theirs.state_dict().items(), strict=True
    ):
        assert ka == kb and torch.equal(a, b_)
    for bad in ({"weight": torch.ones(V + 1)}, {"label_smoothing": 1.5}):
        errors = []
        for cls in (_LinearCrossEntropyModule, torch.nn.LinearCrossEntropyLoss):
            with pytest.raises(Exception) as info:
                cls(*args, **bad)
            errors.append((type(info.value), str(info.value)))
        assert errors[0] == errors[1]


# At most D kept rows: all logits are computed at once, transposed, into the storage of
# d(weight) (one full-size matmul each, d(weight) written back block by block over them). The
# grid: both reductions that reach it, ignored rows (dropped before the projection: 20 rows
# of which 10 kept take it, 20 rows all kept do not), bias, class weights, smoothing, chunks
# of one row to all rows, and float64.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", [(10, 16, 41), (16, 16, 7), (20, 16, 300)], ids=str)
@pytest.mark.parametrize("chunk_rows", [1, 3, None], ids=["row", "three", "default"])
@pytest.mark.parametrize(
    "kw",
    [{}, {"ignore_index": 2, "label_smoothing": 0.2}, {"weight": True, "bias": True}],
    ids=["plain", "ignore-smoothing", "weight-bias"],
)
def test_at_most_d_rows_transposed_pass_matches_torch(
    backend: str, dtype: torch.dtype, reduction: str, shape: tuple[int, int, int],
    chunk_rows: int | None, kw: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    from crossent import _linear

    n, d, v = shape
    calls = []
    real = _linear._run_transposed
    monkeypatch.setattr(
        _linear, "_run_transposed", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    kw = dict(kw)
    x = hidden(n, d, dtype=dtype)
    w = (hidden(v, d, dtype=torch.float64, seed=1) / d**0.5).to(dtype)
    t = testing.make_targets((n,), v, 2)
    if "ignore_index" in kw:
        t[::2] = kw["ignore_index"]  # (20, 16): 10 kept rows
    if kw.pop("weight", False):
        kw["weight"] = testing.make_weight(v, dtype)
    if kw.pop("bias", False):
        kw["linear_bias"] = hidden(v, dtype=dtype, seed=3).requires_grad_()
    chunk = None if chunk_rows is None else chunk_rows * v * dtype.itemsize
    check_same(lce, x, w, t, backend=backend, chunk_bytes=chunk, reduction=reduction, **kw)
    kept = int((t != kw.get("ignore_index", -100)).sum())
    assert bool(calls) == (kept <= d)  # the transposed pass ran exactly when it applies


# The transposed pass (at most D rows) with only some inputs requiring grad: d(weight) alone,
# d(weight) with d(bias), and d(input) alone (no d(weight): the chunked path), each as torch's
# and nothing else given a gradient.
@pytest.mark.parametrize("which", ["w", "wb", "x"])
def test_transposed_pass_gives_only_the_wanted_grads(backend: str, which: str) -> None:
    n, d, v = 9, 16, 37
    x = hidden(n, d).requires_grad_("x" in which)
    w = (hidden(v, d, seed=1) / d**0.5).requires_grad_("w" in which)
    b = hidden(v, seed=2).requires_grad_("b" in which)
    t = testing.make_targets((n,), v, 3)
    check_same(lce, x, w, t, backend=backend, grad=False, linear_bias=b)
    crossent.linear_cross_entropy(x, w, t, linear_bias=b, backend=backend).backward()
    assert [g is not None for g in (x.grad, w.grad, b.grad)] == [c in which for c in "xwb"]


# float16/bfloat16 with at most D kept rows on the CPU backend: the transposed pass, its 16-bit
# gradients each rounded once from float32 (every product in float32 when widened). Both ways;
# both reductions that reach it (the incoming gradient non-uniform through the scale), ignored
# rows, bias, class weights with smoothing; d(weight) blocks and W slices of 3 rows, so
# several of each and a ragged last one.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("widened", [False, True], ids=["native", "widened"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    "kw", [{}, {"weight": True, "label_smoothing": 0.2, "bias": True}], ids=["", "w-ls-b"]
)
def test_half_transposed_pass_both_ways(
    dtype: torch.dtype, widened: bool, reduction: str, kw: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from crossent import _linear

    n, d, v = 16, 24, 41
    from crossent.backends.cpu import CpuBackend

    monkeypatch.setattr(CpuBackend, "widened_products", lambda self, dt: widened)
    monkeypatch.setattr(_linear, "DW_BLOCK_BYTES", 3 * d * 4)  # 3-row blocks and slices
    calls = []
    real = _linear._run_transposed
    monkeypatch.setattr(
        _linear, "_run_transposed", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    kw = dict(kw)
    if kw.pop("weight", False):
        kw["weight"] = testing.make_weight(v, dtype)
    if kw.pop("bias", False):
        kw["linear_bias"] = hidden(v, dtype=dtype, seed=3).requires_grad_()
    x = hidden(n, d, dtype=dtype)
    w = (hidden(v, d, dtype=torch.float64, seed=1) / d**0.5).to(dtype)
    t = testing.make_targets((n,), v, 2)
    t[::3] = -100
    check_half("cpu", x, w, t, 48 * 2**20, reduction=reduction, ignore_index=-100, **kw)
    assert calls  # the transposed pass ran (11 kept rows <= D)


# float16/bfloat16 class-index problems on the CPU backend hold each chunk's logits
# transposed; without native 16-bit matmul instructions every product runs in float32, slice
# by slice of W's rows. Both ways, whichever this CPU takes by default: every reduction (the
# incoming gradient non-uniform), ignored rows, bias, class weights with smoothing, chunks of
# one row and of several, and a slice narrower than V.
@pytest.mark.parametrize("widened", [False, True], ids=["native", "widened"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_rows", [1, 5])
@pytest.mark.parametrize("kw", [{}, {"weight": True, "label_smoothing": 0.2}], ids=["", "w-ls"])
def test_half_column_chunks_both_ways(
    widened: bool, reduction: str, chunk_rows: int, kw: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from crossent import _linear
    from crossent.backends.cpu import CpuBackend

    monkeypatch.setattr(CpuBackend, "widened_products", lambda self, dtype: widened)
    monkeypatch.setattr(CpuBackend, "product_slice_bytes", 7 * D * 4)  # 7-row slices of W
    calls = []
    real = _linear._add_widened_chunk_grads
    monkeypatch.setattr(
        _linear, "_add_widened_chunk_grads", lambda *a: calls.append(1) or real(*a)
    )
    kw = dict(kw)
    if kw.pop("weight", False):
        kw["weight"] = testing.make_weight(V, torch.bfloat16)
    x, w, b = problem(torch.bfloat16, True)
    t = index_targets(-100)
    check_half(
        "cpu", x, w, t, chunk_rows * V * 2, reduction=reduction, ignore_index=-100,
        linear_bias=b.requires_grad_(), **kw,  # type: ignore[union-attr]
    )
    assert _linear._by_columns(x, t, crossent.dispatch.resolve("cpu", x))
    assert bool(calls) == widened


def test_rows_are_spread_evenly_over_the_chunks() -> None:
    from crossent._linear import _Chunks

    def sizes(t: torch.Tensor, size: int) -> list[int]:
        return [r.stop - r.start if isinstance(r, slice) else int(r.numel())
                for r in _Chunks(t, False, -100, size)]

    t = torch.zeros(9, dtype=torch.long)
    assert sizes(t, 4) == [3, 3, 3]  # three chunks either way, none of them 1 row
    assert sizes(t, 9) == [9] and sizes(t, 100) == [9] and sizes(t, 1) == [1] * 9
    assert sizes(torch.zeros(8, dtype=torch.long), 4) == [4, 4]
    t[::3] = -100  # ignored rows are dropped first: 6 kept
    assert sizes(t, 4) == [3, 3]
    assert sizes(torch.full((5,), -100), 4) == []


# ---- hidden states with a sequence dim, float32 loss of 16-bit logits, a divided sum -------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_batched_sequence_hidden_states(backend: str, reduction: str) -> None:
    # (B, T, D) hidden states with (B, T) targets, or (B, T, V) probabilities: as torch's
    # function on the rows, with 'none' losses shaped (B, T)
    h = hidden(2, 5, D).requires_grad_()
    w = hidden(V, D).requires_grad_()
    t = testing.make_targets((2, 5), V, ignore_index=-100, ignore_fraction=0.3)
    p = testing.make_probs((2, 5, V))
    for target, flat in ((t, t.reshape(-1)), (p, p.reshape(-1, V))):
        ours = crossent.linear_cross_entropy(h, w, target, reduction=reduction, backend=backend)
        h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        theirs = F.linear_cross_entropy(h2.reshape(-1, D), w2, flat, reduction=reduction)
        if reduction == "none":
            theirs = theirs.view(2, 5)
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs)
        gen = torch.Generator().manual_seed(3)
        g = torch.rand(ours.shape, generator=gen)
        torch.testing.assert_close(
            torch.autograd.grad(ours, (h, w), g), torch.autograd.grad(theirs, (h2, w2), g)
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logits_dtype_float32_is_transformers_upcast(backend: str, dtype: torch.dtype) -> None:
    # transformers rounds the 16-bit logits, upcasts them and takes a float32 loss: the loss
    # keeps float32 precision instead of being rounded to 16 bits
    h, w = hidden(8, D).to(dtype), hidden(V, D).to(dtype)
    t = testing.make_targets((8,), V)
    ours = crossent.linear_cross_entropy(h, w, t, logits_dtype=torch.float32, backend=backend)
    theirs = F.cross_entropy(F.linear(h, w).float(), t)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert crossent.linear_cross_entropy(h, w, t, backend=backend).dtype == dtype


def test_divisor_divides_the_sum(backend: str) -> None:
    # transformers' num_items_in_batch: reduction='sum' then / n, the gradient scaled alike
    h = hidden(6, D).requires_grad_()
    w = hidden(V, D).requires_grad_()
    t = testing.make_targets((6,), V, ignore_index=-100, ignore_fraction=0.3)
    for divisor in (7, 2.5, torch.tensor(11)):
        ours = crossent.linear_cross_entropy(
            h, w, t, reduction="sum", divisor=divisor, backend=backend
        )
        theirs = F.linear_cross_entropy(h, w, t, reduction="sum") / divisor
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(
            torch.autograd.grad(ours * 3, (h, w)), torch.autograd.grad(theirs * 3, (h, w))
        )
    with pytest.raises(ValueError, match="divisor divides a sum"):
        crossent.linear_cross_entropy(h, w, t, divisor=4)
    with pytest.raises(ValueError, match="one-element"):
        crossent.linear_cross_entropy(h, w, t, reduction="sum", divisor=torch.ones(2))
    with pytest.raises(TypeError, match="logits_dtype"):
        crossent.linear_cross_entropy(h, w, t, logits_dtype=torch.int64)


@pytest.mark.parametrize("wide_output", [True, False], ids=["float32-output", "none"])
def test_weight_gradient_of_16_bit_chunks_is_never_rounded_per_chunk(
    monkeypatch: pytest.MonkeyPatch, wide_output: bool
) -> None:
    # On a GPU d(weight) of 16-bit operands accumulates each chunk's matmul written in float32
    # (aten::mm.dtype); a device without that output is remembered and takes float32 copies of
    # the operands. Both here on CPU tensors: the GPU's matmul stood in for by an exact one
    # (the operands widened), the CPU's own refusal of aten::mm.dtype; and against the result
    # of the widened path itself.
    from crossent import _linear

    gen = torch.Generator().manual_seed(0)
    g = torch.randn(40, 300, generator=gen).bfloat16()
    x = torch.randn(40, 16, generator=gen).bfloat16()
    want = torch.zeros(300, 16)
    want.addmm_(g.float().t(), x.float())
    monkeypatch.setattr(_linear, "_NO_WIDE_OUTPUT", set())
    if wide_output:
        monkeypatch.setattr(_linear, "_mm_wide", lambda a, b, dt: a.to(dt) @ b.to(dt))
    acc = torch.zeros(300, 16)
    _linear._add_weight_grad(acc, g, x, slice_bytes=40 * 4 * 64)  # slices of 64 rows
    torch.testing.assert_close(acc, want, rtol=1e-6, atol=1e-6)
    assert _linear._NO_WIDE_OUTPUT == (set() if wide_output else {"cpu"})


# d(weight) of a bfloat16 parameter on the CPU backend is summed over chunks in 24 bits (the
# gradient's own storage and a byte per element): against the same float32 products summed in
# a float32 array and rounded once, it is the same bfloat16 value almost everywhere, and apart
# by at most one unit in the last place plus 2**-15 of every running sum it went through (a
# 16-bit significand cut by rounding to odd; a bfloat16 running sum would be off by 2**-8 of
# them), however many chunks add to it (one row each here: 96 chunks), on both product paths,
# with every reduction (reduction='none' adds in its backward) and with the token statistics
# of a linear head.
@pytest.mark.parametrize("widened", [False, True], ids=["native", "widened"])
@pytest.mark.parametrize("call", ["mean", "none", "token_stats"])
def test_bf16_weight_gradient_summed_in_24_bits(
    widened: bool, call: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from crossent import _linear
    from crossent.backends.cpu import CpuBackend

    monkeypatch.setattr(CpuBackend, "widened_products", lambda self, dt: widened)
    added: list[int] = []
    real_add = _linear.NarrowSum.add_product
    monkeypatch.setattr(_linear.NarrowSum, "add_product",
                        lambda self, *a: added.append(1) or real_add(self, *a))  # fmt: skip
    n, d, v = 96, 32, 700
    x = hidden(n, d, dtype=torch.bfloat16)
    w = (hidden(v, d, dtype=torch.float64, seed=1) / d**0.5).to(torch.bfloat16)
    t = testing.make_targets((n,), v, 2)

    def grads(lib: str) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        if lib == "float32 sum":  # the same bf16 logits gradient, its products summed in float32
            monkeypatch.setattr(CpuBackend, "narrow_sums", False)
        if call == "token_stats":
            st = crossent.linear_token_stats(xs, ws, t, chunk_bytes=v * 2)
            (st.logprob.sum() + 0.3 * st.entropy.sum()).backward()
        else:
            loss = crossent.linear_cross_entropy(xs, ws, t, reduction=call, backend="cpu",
                                                 chunk_bytes=v * 2)  # fmt: skip
            loss.sum().backward()
        monkeypatch.setattr(CpuBackend, "narrow_sums", True)
        return xs.grad, ws.grad  # type: ignore[return-value]

    dx, dw = grads("crossent")
    assert len(added) >= n  # one row per chunk, each adding every slice of d(weight)
    dx32, dw32 = grads("float32 sum")
    assert dw.dtype == torch.bfloat16 and torch.equal(dx, dx32)
    assert float((dw != dw32).float().mean()) < 0.01
    # the running sums, one row at a time, from the float32 d(logits) crossent's kernel wrote
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    logits = (xs @ ws.t()).float().detach().requires_grad_()
    if call == "token_stats":
        lp = torch.log_softmax(logits, 1)
        ent = -(lp.exp() * lp).sum(1)
        (lp.gather(1, t[:, None]).sum() + 0.3 * ent.sum()).backward()
    else:
        F.cross_entropy(logits, t, reduction=call).sum().backward()
    terms = logits.grad.bfloat16().double()[:, :, None] * x.double()[:, None, :]  # type: ignore[union-attr]
    passed = terms.cumsum(0).abs().sum(0)
    ulp = 2.0 ** (torch.frexp(dw32.double()).exponent - 8).double()
    assert bool(((dw.double() - dw32.double()).abs() <= ulp + 2**-15 * passed).all())
    assert float((dw32 != 0).float().mean()) > 0.9  # gradients that say something


# Without chunk_bytes, chunks are sized from what the 64 MiB allowance leaves: peak resident
# memory above the inputs stays within the gradients + 64 MiB for float32 and bfloat16, at a
# small D and at 2048×512×32000 (where bfloat16 weights went 12 MiB over with a float32
# d(weight) array and fixed 60 MiB chunks). Measured in a fresh process, on a second call
# (the first one's one-time allocations apart), with the kernel's high-water mark
# (bench.memory).
def test_default_chunks_keep_the_memory_allowance() -> None:
    import subprocess
    import sys

    probe = """
import torch, crossent
from crossent._linear import ALLOWANCE
from crossent.bench.memory import peak_above
for n, d, v in ((4096, 64, 32000), (2048, 512, 32000)):
    for dt in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        h = torch.randn(n, d, generator=g).to(dt).requires_grad_()
        w = (torch.randn(v, d, generator=g) / d**0.5).to(dt).requires_grad_()
        t = torch.randint(0, v, (n,), generator=g)
        def step():
            h.grad = w.grad = None
            crossent.linear_cross_entropy(h, w, t, backend="cpu").backward()
        step()
        _, peak = peak_above(step)
        limit = (n * d + v * d) * dt.itemsize + ALLOWANCE
        print(n, d, v, dt, peak.method, peak.peak, limit)
"""
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [line.split() for line in run.stdout.splitlines()]
    assert len(lines) == 4
    if any(line[4] != "hwm" for line in lines):
        pytest.skip("the kernel's high-water mark cannot be reset here")
    over = [line for line in lines if int(line[5]) > int(line[6])]
    assert not over, over
