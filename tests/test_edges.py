"""The edges a training stack reaches: special class weights, in-place gradients over views and
aliased memory, repeated backward passes with the graph kept, buffer reuse, autocast, mixed
dtypes, empty dimensions and other layouts — each compared with what torch does in the same
sequence of calls. A seeded generator of edge inputs closes the module. (Fork safety and the
kernel cache are in ``test_cpu_robustness.py``.)"""

from __future__ import annotations

import functools
import gc
import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from parity import check_same, check_same_exception

import crossent
from crossent import testing
from crossent.backends import buffers

# The backends with code of their own for these paths (the triton backend runs in Triton's
# interpreter here, too slow for the larger shapes below; its own suites cover its kernels).
BACKENDS = ["cpu", "torch"]


def _grad_of(root: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, root)
    return g


# ---- 1. class weights of inf or NaN ---------------------------------------------------------
# A class no target uses gets weight inf or NaN (1/count weights for a class absent from the
# data): the loss and gradient are torch's, finite; 2048×300 is above the size at which
# backend="auto" stops handing the problem to torch.


@pytest.mark.parametrize("special", [math.inf, math.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("backend", ["cpu", "auto", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_special_weight_on_an_unused_class(backend: str, special: float, reduction: str) -> None:
    n, c = 2048, 300
    x = testing.make_logits((n, c), seed=1)
    t = testing.make_targets((n,), c - 1, seed=2)  # class c - 1 never appears
    w = torch.rand(c, generator=torch.Generator().manual_seed(3)) + 0.5
    w[c - 1] = special
    xs = x.clone().requires_grad_()
    ours = crossent.cross_entropy(xs, t, w, reduction=reduction, backend=backend)
    g_ours = _grad_of(xs, ours.sum())
    xt = x.clone().requires_grad_()
    theirs = F.cross_entropy(xt, t, w, reduction=reduction)
    g_theirs = _grad_of(xt, theirs.sum())
    assert torch.isfinite(g_ours).all()
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(g_ours, g_theirs)


# Every backend (the conftest fixture: triton in its interpreter too), small rows, with label
# smoothing: torch's loss is inf (an inf weight times -log p > 0) or NaN, never inf - inf.
@pytest.mark.parametrize("special", [math.inf, math.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_special_weight_every_backend(backend: str, special: float, smoothing: float) -> None:
    x = testing.make_logits((6, 9), seed=1)
    t = testing.make_targets((6,), 8, seed=2)
    w = torch.rand(9, generator=torch.Generator().manual_seed(3)) + 0.5
    w[8] = special
    for reduction in ("none", "mean"):
        # (Triton's interpreter computes in NumPy, which warns on inf - inf)
        check_same("cross_entropy", x, t, weight=w, label_smoothing=smoothing,
                   reduction=reduction, backend=backend,
                   check_warnings=backend != "triton")  # fmt: skip


# A zero class weight beside a -inf logit, with label smoothing: torch's smoothing term is
# Σ_c w_c·(-log p_c) formed term by term, 0·inf is NaN there, and the loss is NaN (a kernel
# that skips zero weights would give a finite number).
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_zero_weight_beside_a_minus_inf_logit(backend: str, reduction: str) -> None:
    x = testing.make_logits((4, 6), seed=1)
    x[1, 2] = -math.inf
    t = torch.tensor([0, 1, 3, 5])
    w = torch.rand(6, generator=torch.Generator().manual_seed(3)) + 0.5
    w[2] = 0.0
    ours = crossent.cross_entropy(x, t, w, label_smoothing=0.1, reduction=reduction,
                                  backend=backend)  # fmt: skip
    theirs = F.cross_entropy(x, t, w, label_smoothing=0.1, reduction=reduction)
    assert theirs.isnan().any()
    torch.testing.assert_close(ours, theirs, equal_nan=True)


# The fused linear head takes three CPU paths: the transposed single pass (N <= D), row
# chunks (N > D, float32) and column chunks (N > D, bfloat16).
@pytest.mark.parametrize(
    ("n", "d", "dtype"),
    [(24, 32, torch.float32), (96, 16, torch.float32), (96, 16, torch.bfloat16)],
    ids=["transposed", "rows", "columns-bf16"],
)
@pytest.mark.parametrize("special", [math.inf, math.nan], ids=["inf", "nan"])
def test_special_weight_on_an_unused_class_linear(
    n: int, d: int, dtype: torch.dtype, special: float
) -> None:
    v = 50
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(n, d, generator=gen).to(dtype)
    lw = (torch.randn(v, d, generator=gen) / 4).to(dtype)
    t = torch.randint(0, v - 1, (n,), generator=gen)
    w = (torch.rand(v, generator=gen) + 0.5).to(dtype)
    w[v - 1] = special
    check_same(
        lambda lib, h, lw, weight: lib.linear_cross_entropy(h, lw, t, weight=weight),
        h, lw, weight=w, backend="cpu",
    )  # fmt: skip
    grads = []
    for fn in (crossent.linear_cross_entropy, F.linear_cross_entropy):
        hh, ww = h.clone().requires_grad_(), lw.clone().requires_grad_()
        fn(hh, ww, t, weight=w).backward()
        grads.append((hh.grad, ww.grad))
    assert all(bool(torch.isfinite(g).all()) for g in grads[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_inf_weight_with_probability_targets(backend: str) -> None:
    # torch: an inf weight times a positive probability is an inf loss (never inf - inf);
    # its gradient is inf or NaN exactly where torch's is
    n, c = 64, 20
    x = testing.make_logits((n, c), seed=5)
    p = torch.softmax(testing.make_logits((n, c), seed=6), 1)
    w = torch.rand(c, generator=torch.Generator().manual_seed(7)) + 0.5
    w[3] = math.inf
    x[:, 3] = x.max() + 1  # class 3 holds each row's max: x - max = 0 there
    for reduction in ("none", "sum", "mean"):
        check_same("cross_entropy", x, p, weight=w, reduction=reduction, backend=backend)


# ---- 2 and 3. inplace_backward: validated before any write; views supported ---------------


def _tensor_bytes(*ts: torch.Tensor) -> list[bytes]:
    return [bytes(t.detach().contiguous().view(torch.uint8).reshape(-1).tolist()) for t in ts]


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_refuses_targets_inside_the_logits(backend: str) -> None:
    # int64 targets stored inside the logits' memory: the gradient would overwrite them before
    # the kernel indexes with them. torch refuses such overlap in its in-place operations.
    n, c = 64, 40
    leaf = torch.randn(n * c, requires_grad=True)
    y = leaf * 1
    x = y[: n * c].view(n, c)
    t = y.detach()[n * c - 2 * n :].view(torch.int64)  # the last rows' bytes
    t.copy_(torch.randint(0, c, (n,)))
    before = _tensor_bytes(x, t)
    with pytest.raises(RuntimeError, match="refer to a single memory location"):
        crossent.cross_entropy(x, t, inplace_backward=True, backend=backend)
    assert _tensor_bytes(x, t) == before
    w = y.detach()[:c]  # class weights inside the logits
    with pytest.raises(RuntimeError, match="refer to a single memory location"):
        crossent.cross_entropy(x, torch.zeros(n, dtype=torch.long), w, inplace_backward=True,
                               backend=backend)  # fmt: skip
    assert _tensor_bytes(x) == before[:1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_refusals_leave_the_tensor_untouched(backend: str) -> None:
    n, c = 16, 30
    t = testing.make_targets((n,), c)
    leaf = testing.make_logits((n, c)).requires_grad_()
    cases: list[tuple[torch.Tensor, str]] = [
        (leaf, "a leaf Variable that requires grad"),
        (leaf.view(n * c).view(n, c), "a view of a leaf Variable"),
        ((leaf[:1] * 1).expand(n, c), "more than one element of the written-to tensor"),
    ]
    for x, message in cases:
        before = _tensor_bytes(x, leaf)
        with pytest.raises(RuntimeError, match=message):
            crossent.cross_entropy(x, t, inplace_backward=True, backend=backend)
        assert _tensor_bytes(x, leaf) == before
    p = torch.softmax(testing.make_logits((n, c), seed=2), 1).requires_grad_()
    x = leaf * 1
    before = _tensor_bytes(x)
    with pytest.raises(RuntimeError, match="inplace_backward=True cannot be used"):
        crossent.cross_entropy(x, p, inplace_backward=True, backend=backend)
    assert _tensor_bytes(x) == before


def _view_cases(n: int, c: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Logits made from a leaf ``root`` by an op, then a view of that result."""
    return {
        "plain": lambda r: r * 2,
        "reshape-view": lambda r: (r * 2).reshape(-1).view(n, c),
        "transposed": lambda r: (r.t() * 2).t(),
        "column-slice": lambda r: torch.cat([r, r[:, :3]], 1)[:, :c],
        "row-slice": lambda r: torch.cat([r, r[:2]], 0)[:n],
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("view", list(_view_cases(1, 1)))
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inplace_backward_on_views(backend: str, view: str, prob: bool, reduction: str) -> None:
    n, c = 24, 37
    root = testing.make_logits((n, c), seed=3)
    t = (
        torch.softmax(testing.make_logits((n, c), seed=4), 1)
        if prob
        else testing.make_targets((n,), c, seed=5)
    )
    make = _view_cases(n, c)[view]
    g_out = testing.make_logits((n,), seed=6) if reduction == "none" else torch.tensor(0.7)
    results = []
    for inplace in (True, False):
        r = root.clone().requires_grad_()
        loss = crossent.cross_entropy(
            make(r), t, reduction=reduction, backend=backend, inplace_backward=inplace
        )
        loss.backward(g_out)
        results.append((loss.detach(), r.grad))
    r = root.clone().requires_grad_()
    expected = F.cross_entropy(make(r), t, reduction=reduction)
    expected.backward(g_out)
    for loss, grad in results:
        torch.testing.assert_close(loss, expected.detach())
        torch.testing.assert_close(grad, r.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_unbatched_and_k_dim(backend: str) -> None:
    # (C,) input (one row, a view inside), K-dim input in channels_last (flattened by a copy)
    root1 = testing.make_logits((40,), seed=7)
    root2 = testing.make_logits((3, 40, 4, 5), seed=8)
    t1 = torch.tensor(5)
    t2 = testing.make_targets((3, 4, 5), 40, seed=9)
    makes = [
        (root1, t1, lambda r: r * 2),
        (root2, t2, lambda r: (r * 2).contiguous(memory_format=torch.channels_last)),
    ]
    for root, t, make in makes:
        grads = []
        for fn in (
            lambda x, t: crossent.cross_entropy(x, t, backend=backend, inplace_backward=True),
            F.cross_entropy,
        ):
            r = root.clone().requires_grad_()
            loss = fn(make(r), t)
            loss.backward()
            grads.append((loss.detach(), r.grad))
        torch.testing.assert_close(grads[0][0], grads[1][0])
        torch.testing.assert_close(grads[0][1], grads[1][1])


def test_inplace_backward_writes_the_gradient_over_the_logits() -> None:
    # the point of the option: no second logits-sized buffer; the logits now hold the gradient
    n, c = 32, 50
    root = testing.make_logits((n, c)).requires_grad_()
    x = root * 1
    t = testing.make_targets((n,), c)
    loss = crossent.cross_entropy(x, t, backend="cpu", inplace_backward=True, reduction="sum")
    expected = torch.softmax(root.detach(), 1) - F.one_hot(t, c)
    torch.testing.assert_close(x.detach(), expected)
    loss.backward()
    torch.testing.assert_close(root.grad, expected)


# ---- 4. retain_graph: .grad never shares memory with the graph ---------------------------------


def _sequence(
    loss_fn: Callable[[torch.Tensor], torch.Tensor], leaf: torch.Tensor, between: str
) -> list[torch.Tensor]:
    """Three backward passes through one graph (retain_graph=True), doing ``between`` to the
    gradient after each, as training code does; returns the gradient seen after each pass."""
    x = leaf.detach().clone().requires_grad_()
    opt = torch.optim.SGD([x], lr=0.0)  # lr 0: step() leaves x alone
    loss = loss_fn(x)
    seen = []
    for _ in range(3):
        loss.backward(retain_graph=True)
        assert x.grad is not None
        seen.append(x.grad.clone())
        if between == "zero_grad":
            opt.zero_grad(set_to_none=False)
        elif between == "data_zero":
            x.grad.data.zero_()
        elif between == "clip":
            torch.nn.utils.clip_grad_norm_([x], 1e-3)
        elif between == "step":
            opt.step()
    return seen


SEQUENCES = ["accumulate", "zero_grad", "data_zero", "clip", "step"]


def _loss_fns(lib: Any, backend: str | None) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    kw = {} if backend is None else {"backend": backend}
    n, c = 24, 33
    t = testing.make_targets((n,), c, seed=1)
    p = torch.softmax(testing.make_logits((n, c), seed=2), 1)
    return {
        # a view between the leaf and the loss
        "index": lambda x: lib.cross_entropy(x.view(n, c), t, **kw),
        "index-sum": lambda x: lib.cross_entropy(x.view(n, c), t, reduction="sum", **kw),
        "prob": lambda x: lib.cross_entropy(x.view(n, c), p, **kw),
        "inplace": lambda x: (
            lib.cross_entropy((x * 1).view(n, c), t, inplace_backward=True, **kw)
            if backend is not None
            else lib.cross_entropy((x * 1).view(n, c), t)
        ),
        "softmax": lambda x: (lib.softmax(x.view(n, c), 1, **kw) * p).sum(),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("between", SEQUENCES)
@pytest.mark.parametrize("loss", list(_loss_fns(F, None)))
def test_retain_graph_sequences(backend: str, between: str, loss: str) -> None:
    leaf = testing.make_logits((24 * 33,), seed=3)
    ours = _sequence(_loss_fns(crossent, backend)[loss], leaf, between)
    theirs = _sequence(_loss_fns(F, None)[loss], leaf, between)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)


# (not "step": an optimizer step changes the input in place, which torch's linear layer saved
# for backward, so torch's next backward raises; crossent saves gradients, not the input)
@pytest.mark.parametrize("between", [s for s in SEQUENCES if s != "step"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(("n", "d"), [(12, 16), (40, 8)], ids=["transposed", "chunks"])
def test_retain_graph_sequences_linear(between: str, reduction: str, n: int, d: int) -> None:
    v = 30
    h = testing.make_logits((n, d), seed=4)
    w = testing.make_logits((v, d), seed=5) / 4
    t = testing.make_targets((n,), v, seed=6)
    seen = []
    for fn in (crossent.linear_cross_entropy, F.linear_cross_entropy):
        ww = w.clone().requires_grad_()
        loss_fn = functools.partial(fn, linear_weight=ww, target=t, reduction=reduction)
        seen.append(_sequence(loss_fn, h, between))
    for a, b in zip(*seen, strict=True):
        torch.testing.assert_close(a, b)


# ---- second derivatives: torch's values, or an error; never a gradient taken as a constant ----


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call", ["index", "prob", "linear", "nll"])
def test_a_gradient_penalty_matches_torch(backend: str, call: str) -> None:
    # g = grad(loss, x, create_graph=True), then (loss + ‖g‖²).backward(): the penalty's
    # second derivative reaches x.grad (and the linear weight's grad) as in torch
    n, c = 8, 12
    x0 = testing.make_logits((n, c), dtype=torch.float64)
    t = testing.make_targets((n,), c)
    p = torch.softmax(testing.make_logits((n, c), seed=2, dtype=torch.float64), 1)
    lw0 = testing.make_logits((c, 6), seed=3, dtype=torch.float64)

    def penalised(lib: Any) -> tuple[torch.Tensor, torch.Tensor]:
        kw = {"backend": backend} if lib is crossent else {}
        x, lw = x0.clone().requires_grad_(), lw0.clone().requires_grad_()
        losses: dict[str, Callable[[], torch.Tensor]] = {
            "index": lambda: lib.cross_entropy(x, t, label_smoothing=0.1, **kw),
            "prob": lambda: lib.cross_entropy(x, p, **kw),
            "linear": lambda: lib.linear_cross_entropy(x[:, :6], lw, t, **kw),
            "nll": lambda: lib.nll_loss(torch.log_softmax(x, 1), t, **kw),
        }
        loss = losses[call]()
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        (loss + g.pow(2).sum()).backward()
        return x.grad, lw.grad

    grads = [penalised(crossent), penalised(F)]
    torch.testing.assert_close(grads[0][0], grads[1][0])
    if call == "linear":
        torch.testing.assert_close(grads[0][1], grads[1][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_gradient_penalty_with_inplace_backward_raises(backend: str) -> None:
    # the logits are overwritten by their gradient: nothing to differentiate twice from
    x = testing.make_logits((8, 12)).requires_grad_()
    t = testing.make_targets((8,), 12)
    loss = crossent.cross_entropy(x * 1, t, backend=backend, inplace_backward=True)
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(loss, x, create_graph=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_second_derivatives_match_torch(
    backend: str, log: bool, dtype: torch.dtype
) -> None:
    x = testing.make_logits((6, 9), dtype=dtype)
    w = testing.make_logits((6, 9), seed=2, dtype=dtype)
    grads = []
    for lib, a, b in ((crossent, x, w), (F, x, w), (F, x.double(), w.double())):
        xx = a.clone().requires_grad_()
        kw = {"backend": backend} if lib is crossent else {}
        y = (lib.log_softmax if log else lib.softmax)(xx, 1, **kw)
        loss = (y * b).sum()
        (g,) = torch.autograd.grad(loss, xx, create_graph=True)
        (loss + g.pow(2).sum()).backward()
        grads.append(xx.grad)
    testing.assert_close_to_oracle(grads[0], grads[2], torch_actual=grads[1])
    if dtype == torch.float64:
        xx = x.clone().requires_grad_()
        assert torch.autograd.gradgradcheck(
            lambda a: (crossent.log_softmax if log else crossent.softmax)(a, 1, backend=backend),
            (xx,),
        )


# ---- the saved gradient leaves the graph only when the graph is freed --------------------------


class _SavedPointers:
    """Records the data pointers of the tensors autograd saves while active."""

    def __init__(self) -> None:
        self.ptrs: set[int] = set()

    def __enter__(self) -> _SavedPointers:
        def pack(t: torch.Tensor) -> torch.Tensor:
            self.ptrs.add(t.data_ptr())
            return t

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


@pytest.mark.parametrize("retain", [False, True])
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_saved_gradient_handed_over_or_scaled_in_place_only_when_the_graph_is_freed(
    retain: bool, scale: float
) -> None:
    # 'sum' then a division (normalising by tokens under gradient accumulation): the
    # incoming gradient is 0.25, folded into the saved d(weight) in place, without a second
    # d(weight)-sized buffer; with the graph kept, a copy.
    n, d, v = 12, 16, 40  # n <= d: the transposed pass saves d(weight) itself
    h = testing.make_logits((n, d), seed=1).requires_grad_()
    w = (testing.make_logits((v, d), seed=2) / 4).requires_grad_()
    t = testing.make_targets((n,), v, seed=3)
    with _SavedPointers() as saved:
        loss = crossent.linear_cross_entropy(h, w, t, reduction="sum", backend="cpu") * scale
    loss.backward(retain_graph=retain)
    assert w.grad is not None
    assert (w.grad.data_ptr() in saved.ptrs) == (not retain)
    hh, ww = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    (F.linear_cross_entropy(hh, ww, t, reduction="sum") * scale).backward()
    torch.testing.assert_close(w.grad, ww.grad)
    torch.testing.assert_close(h.grad, hh.grad)
    # and the same for cross entropy's logits-sized gradient buffer
    x = testing.make_logits((64, 100), seed=4).requires_grad_()
    tx = testing.make_targets((64,), 100, seed=5)
    with _SavedPointers() as saved:
        loss = crossent.cross_entropy(x, tx, reduction="sum", backend="cpu") * scale
    loss.backward(retain_graph=retain)
    assert x.grad is not None
    assert (x.grad.data_ptr() in saved.ptrs) == (not retain)


# ---- 6 and 10. buffer reuse: off by default; never over memory the caller holds --------------


def _live_storages(ptrs: set[int]) -> list[torch.Tensor]:
    gc.collect()
    found = []
    for obj in gc.get_objects():
        try:
            if type(obj) is torch.Tensor and obj.untyped_storage().data_ptr() in ptrs:
                found.append(obj)
        except Exception:
            continue
    return found


def test_buffers_are_not_kept_between_calls_by_default() -> None:
    # a kept buffer would stay resident through the rest of a training step
    assert not crossent.buffer_reuse()
    crossent.empty_cache()
    x = testing.make_logits((64, 8192)).requires_grad_()  # 2 MiB: a size the cache would take
    t = testing.make_targets((64,), 8192)
    crossent.cross_entropy(x, t, backend="cpu").backward()
    y = crossent.softmax(x.detach(), 1, backend="cpu")
    assert buffers.cached_bytes() == 0
    ptrs = {x.grad.untyped_storage().data_ptr(), y.untyped_storage().data_ptr()}
    x.grad = None
    del y
    assert _live_storages(ptrs) == []  # released as soon as the caller lets go


@pytest.fixture
def reuse() -> Iterator[None]:
    previous = crossent.set_buffer_reuse(True)
    crossent.empty_cache()
    yield
    crossent.set_buffer_reuse(previous)


@pytest.mark.usefixtures("reuse")
def test_reuse_never_writes_into_a_storage_the_caller_holds() -> None:
    shape = (64, 8192)
    t = testing.make_targets(shape[:1], shape[1])
    x = testing.make_logits(shape).requires_grad_()
    crossent.cross_entropy(x, t, backend="cpu").backward()
    storage = x.grad.untyped_storage()  # the caller keeps only the storage
    kept = x.grad.clone()
    ptr = x.grad.data_ptr()
    x.grad = None
    y = (testing.make_logits(shape, seed=9) * 3).requires_grad_()
    crossent.cross_entropy(y, t, backend="cpu").backward()
    assert y.grad.data_ptr() != ptr
    held = torch.empty(0).set_(storage, 0, shape, (shape[1], 1))
    assert torch.equal(held, kept)
    del held, storage
    y.grad = None
    crossent.cross_entropy(y, t, backend="cpu").backward()  # now free: reused
    assert y.grad.data_ptr() == ptr


# ---- 8 and 9. dtype promotion and autocast --------------------------------------------------


def _promotion_cases() -> list[tuple[str, dict[str, Any]]]:
    n, v = 6, 10
    gen = torch.Generator().manual_seed(11)
    p32 = torch.softmax(torch.randn(n, v, generator=gen), 1)
    return [
        ("prob-f32", {"target": p32}),
        ("prob-f64", {"target": p32.double()}),
        ("prob-f32-weight-f32", {"target": p32, "weight": torch.rand(v, generator=gen)}),
        ("prob-bf16-weight-f32",
         {"target": p32.bfloat16(), "weight": torch.rand(v, generator=gen)}),  # fmt: skip
    ]


@pytest.mark.parametrize(("name", "kw"), _promotion_cases(), ids=[c[0] for c in _promotion_cases()])
def test_linear_loss_dtype_promotes_as_torch(name: str, kw: dict[str, Any]) -> None:
    gen = torch.Generator().manual_seed(12)
    h = torch.randn(6, 8, generator=gen).bfloat16()
    w = torch.randn(10, 8, generator=gen).bfloat16()
    target = kw.pop("target")
    ours, theirs = check_same(
        lambda lib, h, w: lib.linear_cross_entropy(h, w, target, **kw), h, w, backend="cpu"
    )
    assert ours.dtype == theirs.dtype == torch.promote_types(
        torch.promote_types(torch.bfloat16, target.dtype), kw.get("weight", target).dtype
    )


AUTOCAST = [torch.bfloat16, torch.float16]


def _autocast_calls() -> dict[str, Callable[..., Any]]:
    """Calls of ``(lib, x, xb, lw, h)``: float32 logits x, bfloat16 logits xb, a classifier
    lw and hidden states h (16-bit tensors come as arguments, so that the float64 evaluation
    of the same call really is float64)."""
    n, c = 12, 20
    t = testing.make_targets((n,), c, seed=1)
    t[2] = -100
    p = torch.softmax(testing.make_logits((n, c), seed=2), 1)
    w = torch.rand(c, generator=torch.Generator().manual_seed(3)) + 0.5
    return {
        "softmax": lambda lib, x, xb, lw, h: lib.softmax(x, 1),
        "log_softmax": lambda lib, x, xb, lw, h: lib.log_softmax(x, 1),
        "log_softmax-low": lambda lib, x, xb, lw, h: lib.log_softmax(xb, 1),
        "nll_loss": lambda lib, x, xb, lw, h: lib.nll_loss(torch.log_softmax(x, 1), t, w),
        "nll_loss-low": lambda lib, x, xb, lw, h: lib.nll_loss(xb, t),
        "cross_entropy": lambda lib, x, xb, lw, h: lib.cross_entropy(
            x, t, w, label_smoothing=0.1
        ),
        "cross_entropy-low": lambda lib, x, xb, lw, h: lib.cross_entropy(xb, t),
        "cross_entropy-prob": lambda lib, x, xb, lw, h: lib.cross_entropy(x, p, w),
    }


@pytest.mark.parametrize("dtype", AUTOCAST)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call", list(_autocast_calls()))
def test_autocast_follows_torch(dtype: torch.dtype, backend: str, call: str) -> None:
    fn = _autocast_calls()[call]
    x = testing.make_logits((12, 20), seed=4)
    lw = testing.make_logits((20, 8), seed=5) / 3
    h = testing.make_logits((12, 8), seed=6)

    def under_autocast(lib: Any, *args: torch.Tensor) -> Any:
        with torch.autocast("cpu", dtype=dtype):
            return fn(lib, *args)

    check_same(under_autocast, x, x.bfloat16(), lw, h, backend=backend)


def _linear_autocast_calls() -> dict[str, Callable[..., Any]]:
    n, v = 12, 20
    t = testing.make_targets((n,), v, seed=1)
    t[2] = -100
    p = torch.softmax(testing.make_logits((n, v), seed=2), 1)
    w = torch.rand(v, generator=torch.Generator().manual_seed(3)) + 0.5

    def f64(a: torch.Tensor, h: torch.Tensor) -> torch.Tensor:  # float64 for the oracle
        return a.double() if h.dtype == torch.float64 else a

    return {
        # N > D (row chunks) with class weights and an ignored row
        "weighted": lambda f, h, lw, b: f(h, lw, t, weight=f64(w, h), linear_bias=b),
        # N <= D, where a plain call takes the single transposed pass
        "wide": lambda f, h, lw, b: f(torch.cat([h, h], 1), torch.cat([lw, lw], 1), t),
        "prob": lambda f, h, lw, b: f(h, lw, f64(p, h)),
        "none": lambda f, h, lw, b: f(h, lw, t, reduction="none", label_smoothing=0.1),
    }


@pytest.mark.parametrize("dtype", AUTOCAST)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call", list(_linear_autocast_calls()))
def test_autocast_linear_follows_torch(dtype: torch.dtype, backend: str, call: str) -> None:
    # torch under autocast: the linear layer in the autocast dtype, cross entropy in float32,
    # gradients cast back to the parameters' float32. The float64 oracle runs the same
    # computation on the operands rounded to the autocast dtype; both libraries compute their
    # matmul products in that dtype, so its floor applies (crossent's parameter gradients are
    # summed in float32 and never rounded to 16 bits, torch's are).
    fn = _linear_autocast_calls()[call]
    inputs = [
        testing.make_logits((12, 8), seed=6),
        testing.make_logits((20, 8), seed=5) / 3,
        testing.make_logits((20,), seed=7),
    ]
    results = []
    for lib in (functools.partial(crossent.linear_cross_entropy, backend=backend),
                F.linear_cross_entropy, None):  # fmt: skip
        leaves = [
            (t.to(dtype).double() if lib is None else t.clone()).requires_grad_() for t in inputs
        ]
        if lib is None:
            loss = fn(F.linear_cross_entropy, *leaves)
        else:
            with torch.autocast("cpu", dtype=dtype):
                loss = fn(lib, *leaves)
        g = testing.make_logits(loss.shape, seed=8) if loss.dim() else torch.tensor(0.7)
        loss.backward(g.to(loss.dtype))
        results.append([loss.detach(), *(t.grad for t in leaves)])
    ours, theirs, oracle = results
    assert [None if t is None else t.dtype for t in ours] == [
        None if t is None else t.dtype for t in theirs
    ]
    names = ["loss", "d(input)", "d(weight)", "d(bias)"]
    for what, a, b, r in zip(names, ours, theirs, oracle, strict=True):
        if r is None:
            assert a is None and b is None
            continue
        testing.assert_close_to_oracle(a, r, torch_actual=b, dtype=dtype, what=what)


# ---- 11. empty dimensions and other layouts -------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_with_no_features(backend: str, reduction: str) -> None:
    # D = 0: every logit is the bias (or 0), the loss log V (torch returns it too)
    t = testing.make_targets((5,), 7)
    b = testing.make_logits((7,), seed=2)
    check_same(
        lambda lib, h, w: lib.linear_cross_entropy(h, w, t, reduction=reduction),
        torch.zeros(5, 0), torch.zeros(7, 0), backend=backend,
    )  # fmt: skip
    check_same(
        lambda lib, h, w, b: lib.linear_cross_entropy(h, w, t, linear_bias=b, reduction=reduction),
        torch.zeros(5, 0), torch.zeros(7, 0), b, backend=backend,
    )  # fmt: skip


@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_probability_targets_without_classes(backend: str, reduction: str) -> None:
    ours = crossent.cross_entropy(torch.randn(4, 0), torch.randn(4, 0), reduction=reduction,
                                  backend=backend)  # fmt: skip
    theirs = F.cross_entropy(torch.randn(4, 0), torch.randn(4, 0), reduction=reduction)
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    zero = theirs == 0
    assert torch.equal(torch.signbit(ours[zero]), torch.signbit(theirs[zero]))  # -0.0, as torch


@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
@pytest.mark.parametrize("shape", [(4, 0, 3), (2, 0, 3, 2, 2)], ids=["3d", "5d"])
@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
def test_k_dim_input_without_classes_raises(backend: str, shape: tuple[int, ...], fn: str) -> None:
    x = torch.randn(shape)
    for fill in (0, -100):  # a target in range of nothing, and every target ignored
        t = torch.full((shape[0], *shape[2:]), fill, dtype=torch.long)
        check_same_exception(fn, x, t, backend=backend, expected=RuntimeError,
                             match="size mismatch")  # fmt: skip


@pytest.mark.parametrize("backend", [*BACKENDS, "reference", "auto"])
def test_sparse_logits_raise_not_implemented(backend: str) -> None:
    xs = torch.randn(4, 5).to_sparse()
    t = torch.zeros(4, dtype=torch.long)
    calls: list[Callable[[Any], Any]] = [
        lambda lib: lib.cross_entropy(xs, t),
        lambda lib: lib.cross_entropy(xs, torch.rand(4, 5)),
        lambda lib: lib.nll_loss(xs, t),
        lambda lib: lib.softmax(xs, 1),
        lambda lib: lib.log_softmax(xs, 1),
    ]
    for call in calls:
        check_same_exception(call, backend=backend, expected=NotImplementedError)
    with pytest.raises(NotImplementedError, match="strided"):
        crossent.cross_entropy(xs, t, z_loss=1e-4, backend=backend)
    # torch's linear layer takes sparse input: the same loss as torch's, or, with crossent's
    # own options (which torch's function lacks), an error rather than ignoring them
    h, w = torch.randn(4, 3).to_sparse(), torch.randn(5, 3)
    check_same_exception(lambda lib: lib.linear_cross_entropy(h, w, t), backend=backend)
    with pytest.raises(NotImplementedError, match="strided"):
        crossent.linear_cross_entropy(h, w, t, z_loss=1e-4, backend=backend)


# ---- a generator of edge inputs, compared with torch ---------------------------------------
# Each seed draws one call: small shapes (rows 0, 1 and a few; classes 1 upwards), every
# dtype, special values in the logits (±inf, NaN, ±1e4), weights with inf, NaN, zeros and
# negatives, ignore_index inside and outside the classes, every reduction, label smoothing,
# probability targets, and non-contiguous layouts (transposed, sliced, expanded). torch and
# crossent must agree on the value, NaN/inf positions, gradients — or raise the same type.
# (Special values go into rows that are not ignored: an ignored row's gradient is exactly 0
# in crossent whatever its logits hold, where torch's is NaN for a row holding NaN or ±inf;
# test_ignored_rows_with_special_logits pins that difference.)

SEEDS = range(160)


def _draw(seed: int) -> tuple[Callable[..., Any], torch.Tensor, dict[str, Any]]:
    """One call ``fn(lib, x, **kwargs)``, its logits x and its tensor keyword arguments (as
    arguments, so that the float64 evaluation of the same call is float64 throughout)."""
    rnd = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    dtype = rnd.choice([torch.float32, torch.float32, torch.float64, torch.bfloat16])
    n = rnd.choice([0, 1, 3, 8, 17])
    c = rnd.choice([1, 2, 5, 33])
    x = torch.randn(n, c, generator=gen, dtype=torch.float64) * rnd.choice([1, 5])
    tensors: dict[str, Any] = {}
    if rnd.random() < 0.6:
        weight = torch.rand(c, generator=gen, dtype=torch.float64) + 0.1
        kind = rnd.choice(["inf-unused", "nan-unused", "zeros", "negative", "plain"])
        if kind == "zeros":
            weight[: max(1, c // 2)] = 0
        elif kind == "negative":
            weight[0] = -weight[0]
        elif kind in ("inf-unused", "nan-unused") and c > 1:
            weight[c - 1] = math.inf if kind == "inf-unused" else math.nan
        tensors["weight"] = weight.to(dtype)
    reduction = rnd.choice(["mean", "sum", "none"])
    # the layout is made inside the call, from the leaf: views reach both libraries as views
    layout = rnd.choice(["plain", "plain", "transposed", "sliced", "expanded"])
    lay: Callable[[torch.Tensor], torch.Tensor] = {
        "plain": lambda a: a,
        "transposed": lambda a: a.t().contiguous().t(),
        "sliced": lambda a: torch.cat([a, a], 1)[:, ::2],
        "expanded": lambda a: a[:1].expand(a.shape[0], c) if a.shape[0] else a,
    }[layout]
    prob = rnd.random() < (0.3 if "weight" not in tensors else 0.2)
    kept = list(range(n))
    if prob:
        target = torch.softmax(torch.randn(n, c, generator=gen, dtype=torch.float64), 1)
        tensors["target"] = target.to(dtype if "weight" in tensors else rnd.choice(
            [dtype, torch.float32]))  # fmt: skip
        kw: dict[str, Any] = {"reduction": reduction,
                              "label_smoothing": rnd.choice([0.0, 0.0, 0.2])}  # fmt: skip
        fn = "cross_entropy"
    else:
        w = tensors.get("weight")
        unused_last = w is not None and c > 1 and not bool(torch.isfinite(w[c - 1]))
        target = torch.randint(0, c - 1 if unused_last else c, (n,), generator=gen)
        ignore = rnd.choice([-100, 0, c + 3])
        fn = rnd.choice(["cross_entropy", "cross_entropy", "nll_loss"])
        kw = {"reduction": reduction, "ignore_index": ignore}
        if fn == "cross_entropy":
            kw["label_smoothing"] = rnd.choice([0.0, 0.0, 0.15])
        # (torch's smoothing term gives an ignored row 0·inf = NaN gradients under a
        # non-finite weight: the difference pinned below, so no ignored row then)
        special_w = w is not None and not bool(torch.isfinite(w).all())
        if n and rnd.random() < 0.5 and not (special_w and kw.get("label_smoothing")):
            target[rnd.randrange(n)] = ignore
        tensors["target"] = target
        kept = [i for i in range(n) if int(target[i]) != ignore]
        if layout == "expanded" and len(kept) < n:
            kept = []  # every row is row 0
    for _ in range(rnd.randrange(3)):
        if kept:
            x[rnd.choice(kept), rnd.randrange(c)] = rnd.choice(
                [math.inf, -math.inf, math.nan, 1e4, -1e4]
            )
    if fn == "nll_loss":
        call = lambda lib, x, **t: lib.nll_loss(torch.log_softmax(lay(x), 1), **t, **kw)  # noqa: E731
    else:
        call = lambda lib, x, **t: lib.cross_entropy(lay(x), **t, **kw)  # noqa: E731
    return call, x.to(dtype), tensors


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", SEEDS)
def test_generated_edges(backend: str, seed: int) -> None:
    call, x, tensors = _draw(seed)
    check_same_exception(call, x, backend=backend, seed=seed, **tensors)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_with_special_logits(backend: str) -> None:
    # A deliberate difference: the ignored rows' gradient is exactly zero; torch's
    # log_softmax backward makes it NaN on rows that hold NaN or ±inf (0·NaN), and its label
    # smoothing term on every ignored row when a class weight is inf or NaN (0·inf).
    x = testing.make_logits((4, 6)).requires_grad_()
    with torch.no_grad():
        x[1, 2] = math.nan
        x[2, 0] = math.inf
        x[3] = -math.inf
    t = torch.tensor([1, -100, -100, -100])
    loss = crossent.cross_entropy(x, t, backend=backend)
    (g,) = torch.autograd.grad(loss, x)
    xt = x.detach().clone().requires_grad_()
    (gt,) = torch.autograd.grad(F.cross_entropy(xt, t), xt)
    torch.testing.assert_close(g[0], gt[0])
    assert torch.equal(g[1:], torch.zeros(3, 6)) and bool(gt[1:3].isnan().all())
    torch.testing.assert_close(loss, F.cross_entropy(x.detach(), t))
    w = torch.tensor([1.0, 2.0, 1.0, 1.0, 1.0, math.inf])
    x2 = testing.make_logits((3, 6)).requires_grad_()
    t2 = torch.tensor([1, -100, 2])
    (g,) = torch.autograd.grad(
        crossent.cross_entropy(x2, t2, w, label_smoothing=0.1, backend=backend, reduction="sum"),
        x2,
    )
    x2t = x2.detach().clone().requires_grad_()
    (gt,) = torch.autograd.grad(F.cross_entropy(x2t, t2, w, label_smoothing=0.1,
                                                reduction="sum"), x2t)  # fmt: skip
    assert torch.equal(g[1], torch.zeros(6)) and bool(gt[1].isnan().all())
