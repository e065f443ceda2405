"""What the fused cross entropy keeps and hands over: one logits-sized buffer, no copies."""

from __future__ import annotations

import gc
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import crossent
from crossent.testing import make_logits, make_targets


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradient_buffer_is_handed_over_without_copy(reduction: str) -> None:
    # With incoming gradient 1, backward returns the buffer written in forward; autograd then
    # moves it into .grad instead of copying it.
    x = make_logits((8, 300), requires_grad=True)
    t = make_targets((8,), 300)
    loss = crossent.cross_entropy(x, t, reduction=reduction, backend="torch")
    (saved,) = loss.grad_fn.saved_tensors
    assert saved.shape == x.shape and saved.dtype == x.dtype
    ptr = saved.data_ptr()
    del saved
    loss.backward()
    assert x.grad.data_ptr() == ptr
    expected = torch.autograd.grad(F.cross_entropy(x, t, reduction=reduction), x)[0]
    torch.testing.assert_close(x.grad, expected)


def test_only_the_gradient_is_saved_not_log_probabilities() -> None:
    x = make_logits((6, 50), requires_grad=True)
    loss = crossent.cross_entropy(x, make_targets((6,), 50), label_smoothing=0.1, backend="cpu")
    saved = loss.grad_fn.saved_tensors
    assert len(saved) == 1 and saved[0].shape == (6, 50)


def test_retain_graph_keeps_the_buffer_intact() -> None:
    # A second backward through a retained graph must see the same buffer: accumulated grads
    # are exactly twice those of one backward, as with torch.
    x = make_logits((5, 40), requires_grad=True)
    t = make_targets((5,), 40)
    loss = crossent.cross_entropy(x, t) * 3.0  # incoming gradient 3: the scaled path
    loss.backward(retain_graph=True)
    once = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * once)
    y = x.detach().clone().requires_grad_()
    (F.cross_entropy(y, t) * 3.0).backward()
    torch.testing.assert_close(once, y.grad)


def test_no_grad_inference_saves_nothing() -> None:
    x = make_logits((4, 30), requires_grad=True)
    t = make_targets((4,), 30)
    with torch.no_grad():
        loss = crossent.cross_entropy(x, t)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, F.cross_entropy(x.detach(), t))


def test_caller_tensors_are_never_modified() -> None:
    x = make_logits((7, 33), requires_grad=True)
    t = make_targets((7,), 33)
    w = torch.rand(33)
    probs = torch.softmax(make_logits((7, 33), seed=1), 1).requires_grad_()
    before = [a.detach().clone() for a in (x, t, w, probs)]
    crossent.cross_entropy(x, t, weight=w, label_smoothing=0.2).backward()
    crossent.cross_entropy(x, probs, weight=w).backward()
    crossent.nll_loss(x, t, weight=w).backward()
    crossent.log_softmax(x, 1).sum().backward()
    for a, b in zip((x, t, w, probs), before, strict=True):
        assert torch.equal(a.detach(), b)


# inplace_backward: the gradient is written over the logits (no second logits-sized buffer);
# values and gradients equal the default path's. Logits come out of a matmul (not a leaf), as
# in a language-model head.
@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["index", "probs"])
def test_inplace_backward_matches_and_reuses_the_logits(backend: str, dtype: torch.dtype,
                                                         kind: str) -> None:
    h = make_logits((6, 16), dtype, seed=1, scale=1.0)
    w = make_logits((40, 16), dtype, seed=2, scale=0.3)
    target = (make_targets((6,), 40) if kind == "index"
              else torch.softmax(make_logits((6, 40), seed=3), 1).to(dtype))
    grads = []
    for inplace in (False, True):
        hh = h.clone().requires_grad_()
        logits = hh @ w.T
        ptr = logits.data_ptr()
        loss = crossent.cross_entropy(logits, target, label_smoothing=0.1, backend=backend,
                                      inplace_backward=inplace)
        if inplace:
            (saved,) = [t for t in loss.grad_fn.saved_tensors if t is not None]
            assert saved.data_ptr() == ptr  # the gradient lives in the logits' storage
        loss.backward()
        grads.append((loss.detach(), hh.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_inplace_backward_refuses_a_leaf_and_target_gradients() -> None:
    x = make_logits((3, 5), requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf"):
        crossent.cross_entropy(x, make_targets((3,), 5), inplace_backward=True)
    logits = x * 1.0
    probs = torch.softmax(make_logits((3, 5), seed=4), 1).requires_grad_()
    with pytest.raises(RuntimeError, match="inplace_backward"):
        crossent.cross_entropy(logits, probs, inplace_backward=True)


def test_inplace_backward_without_grad_leaves_the_logits_alone() -> None:
    x = make_logits((3, 5))
    before = x.clone()
    loss = crossent.cross_entropy(x, make_targets((3,), 5), inplace_backward=True)
    assert torch.equal(x, before)
    torch.testing.assert_close(loss, F.cross_entropy(before, make_targets((3,), 5)))


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest storage (in elements) of any tensor a torch op returns while
    active (expanded views, which own no memory of their size, count for what they own)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                owned = t.untyped_storage().nbytes() // t.element_size()
                self.largest = max(self.largest, owned)
        return out


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_never_holds_the_logits(backend: str, reduction: str) -> None:
    n, d, v, rows = 128, 16, 4000, 8
    h = make_logits((n, d), requires_grad=True)
    w = make_logits((v, d), requires_grad=True)
    t = make_targets((n,), v)
    with _LargestTensor() as seen:
        loss = crossent.linear_cross_entropy(
            h, w, t, reduction=reduction, backend=backend, chunk_bytes=rows * v * 4
        )
        if reduction == "mean":  # forward leaves only the two gradients behind
            saved = [s for s in loss.grad_fn.saved_tensors if s is not None]
            assert [s.shape for s in saved] == [h.shape, w.shape]
            del saved
        loss.sum().backward()
    # the largest tensors are the weight gradient (V×D) and one chunk of logits (8×V)
    assert seen.largest <= max(v * d, rows * v) < n * v // 4
    expected = torch.autograd.grad(F.cross_entropy(h @ w.t(), t, reduction=reduction).sum(),
                                   (h, w))
    torch.testing.assert_close(h.grad, expected[0])
    torch.testing.assert_close(w.grad, expected[1])


def test_linear_token_stats_never_holds_the_logits() -> None:
    n, d, v, rows = 128, 16, 4000, 8
    h = make_logits((n, d), requires_grad=True)
    w = make_logits((v, d), requires_grad=True)
    t = make_targets((n,), v)
    with _LargestTensor() as seen:
        stats = crossent.linear_token_stats(h, w, t, chunk_bytes=rows * v * 4)
        (stats.logprob.sum() + 0.1 * stats.entropy.sum()).backward()
    assert seen.largest <= max(v * d, rows * v) < n * v // 4


class _MatmulRows(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the rows of hidden states that enter the projection matmuls."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.d, self.rows = d, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in (torch.ops.aten.mm.default, torch.ops.aten.mm.out, torch.ops.aten.addmm.out,
                    torch.ops.aten.addmm.default):
            a = args[1] if "addmm" in str(func) else args[0]
            if a.dim() == 2 and a.shape[1] == self.d and a.is_contiguous():
                self.rows += a.shape[0]  # (rows, D) @ (D, V): a chunk's logits
        return func(*args, **(kwargs or {}))


def test_linear_cross_entropy_skips_ignored_rows_before_the_projection() -> None:
    n, d, v = 40, 12, 300
    h = make_logits((n, d), requires_grad=True)
    w = make_logits((v, d), requires_grad=True)
    t = make_targets((n,), v)
    t[::4] = -100  # 10 of 40 rows ignored
    with _MatmulRows(d) as seen:
        loss = crossent.linear_cross_entropy(h, w, t, chunk_bytes=7 * v * 4)
    assert seen.rows == 30
    loss.backward()
    assert torch.equal(h.grad[::4], torch.zeros(10, d))


def _tensors_on(ptrs: set[int]) -> list[torch.Tensor]:
    """Live tensors whose storage starts at one of ``ptrs``."""
    gc.collect()
    found = []
    for o in gc.get_objects():
        # type(), not isinstance: isinstance reads __class__, which some deprecated objects
        # answer with a warning. Plain tensors and parameters only: the fake and functional
        # tensors torch.compile leaves behind (another test) have no storage to point to.
        if type(o) in (torch.Tensor, torch.nn.Parameter) and o.layout == torch.strided:
            if o.untyped_storage().data_ptr() in ptrs:
                found.append(o)
    return found


# The chunk buffer of linear_cross_entropy is freed before the gradients are converted from
# their float32 accumulators to 16 bits: a view of it kept alive until then adds a chunk to
# the peak. Checked when the conversion starts, with rows > D (the chunked path), for float32
# (no conversion) and bfloat16 (column chunks).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_chunk_buffer_is_freed_before_the_gradients_are_converted(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    from crossent import _linear

    n, d, v = 40, 8, 300
    h = make_logits((n, d), dtype).requires_grad_()
    w = make_logits((v, d), dtype).requires_grad_()
    t = make_targets((n,), v)
    buffers: set[int] = set()
    alive: list[torch.Tensor] = []
    real_chunk, real_final = _linear._chunk, _linear.final_grads

    def chunk(buf: torch.Tensor, *a: Any) -> torch.Tensor:
        buffers.add(buf.untyped_storage().data_ptr())
        return real_chunk(buf, *a)

    def final(*a: Any) -> Any:
        alive.extend(_tensors_on(buffers))
        return real_final(*a)

    monkeypatch.setattr(_linear, "_chunk", chunk)
    monkeypatch.setattr(_linear, "final_grads", final)
    crossent.linear_cross_entropy(h, w, t, chunk_bytes=7 * v * dtype.itemsize).backward()
    assert buffers and not alive
    assert h.grad is not None and w.grad is not None and w.grad.dtype == dtype


def test_logits_do_not_outlive_the_backward() -> None:
    # kept by reference for second derivatives, the logits are let go by a backward that
    # frees the graph, while the loss tensor (and so autograd's node) still lives
    import weakref

    h = make_logits((16, 8), requires_grad=True)
    w = make_logits((300, 8), seed=1, requires_grad=True)
    t = make_targets((16,), 300)
    for call in (
        lambda z: crossent.cross_entropy(z, t, backend="cpu"),
        lambda z: crossent.cross_entropy(z, torch.softmax(z.detach(), 1), backend="cpu"),
    ):
        logits = h @ w.t()
        ref = weakref.ref(logits)
        loss = call(logits)
        del logits
        loss.backward()
        gc.collect()
        assert ref() is None
        assert loss.grad_fn is not None
    x = h * 1
    ref = weakref.ref(x)
    loss = crossent.linear_cross_entropy(x, w, t, backend="cpu")
    del x
    loss.backward()
    gc.collect()
    assert ref() is None
