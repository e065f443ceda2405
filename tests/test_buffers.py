"""Reuse of large CPU buffers (switched on here): only once nothing else references them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

import crossent
from crossent.backends import buffers
from crossent.testing import make_logits, make_targets

SHAPE = (64, 8192)  # 2 MiB of float32: above buffers.MIN_BYTES


@pytest.fixture(autouse=True)
def reuse() -> Iterator[None]:
    """These tests exercise reuse, which is off by default."""
    previous = crossent.set_buffer_reuse(True)
    yield
    crossent.set_buffer_reuse(previous)


def test_a_released_gradient_buffer_is_reused_and_a_held_one_is_not() -> None:
    crossent.empty_cache()
    x = make_logits(SHAPE, requires_grad=True)
    t = make_targets(SHAPE[:1], SHAPE[1])
    crossent.cross_entropy(x, t).backward()
    first = x.grad
    ptr = first.data_ptr()
    # the caller still holds the first gradient: a second call must not write into it
    y = x.detach().clone().requires_grad_()
    crossent.cross_entropy(y, t).backward()
    assert y.grad.data_ptr() != ptr
    torch.testing.assert_close(first, y.grad)  # the held gradient is intact
    # once released, its memory is handed out again, with correct values
    del first
    x.grad = None
    y.grad = None
    z = (x.detach() * 2).requires_grad_()
    crossent.cross_entropy(z, t).backward()
    assert z.grad.data_ptr() == ptr
    expected = torch.autograd.grad(F.cross_entropy(z, t), z)[0]
    torch.testing.assert_close(z.grad, expected)


def test_small_buffers_and_empty_cache() -> None:
    crossent.empty_cache()
    assert buffers.cached_bytes() == 0
    small = make_logits((4, 10), requires_grad=True)
    crossent.cross_entropy(small, make_targets((4,), 10)).backward()
    assert buffers.cached_bytes() == 0  # below MIN_BYTES: plain allocation
    x = make_logits(SHAPE, requires_grad=True)
    crossent.cross_entropy(x, make_targets(SHAPE[:1], SHAPE[1])).backward()
    assert buffers.cached_bytes() == x.numel() * 4
    crossent.empty_cache()
    assert buffers.cached_bytes() == 0
    assert torch.isfinite(x.grad).all()  # the caller's gradient outlives the cache


def test_softmax_output_and_gradient_never_share_memory() -> None:
    crossent.empty_cache()
    x = make_logits(SHAPE, requires_grad=True)
    for _ in range(3):  # steady state: both buffers come from the cache
        x.grad = None
        y = crossent.softmax(x, 1)
        g = make_logits(SHAPE, seed=1)
        y.backward(g)
        assert y.data_ptr() != x.grad.data_ptr()
        x2 = x.detach().clone().requires_grad_()
        torch.softmax(x2, 1).backward(g)
        torch.testing.assert_close(x.grad, x2.grad)
        torch.testing.assert_close(y, torch.softmax(x.detach(), 1))


def test_reused_gradients_behave_as_plain_tensors() -> None:
    # Three SGD steps with zero_grad(set_to_none=False), which detaches and zeroes .grad in
    # place: the reused buffers behave as ordinary tensors, and training matches torch's.
    crossent.empty_cache()
    h = make_logits((64, 16))
    t = make_targets((64,), SHAPE[1])
    weights = []
    for loss_fn in (crossent.cross_entropy, F.cross_entropy):
        torch.manual_seed(0)
        model = torch.nn.Linear(16, SHAPE[1], bias=False)  # logits (64, 8192): cached size
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(3):
            opt.zero_grad(set_to_none=False)
            logits = model(h)
            logits.retain_grad()
            loss_fn(logits, t).backward()
            assert logits.grad is not None and logits.grad._base is None
            opt.step()
        weights.append(model.weight.detach())
    torch.testing.assert_close(weights[0], weights[1])
    assert buffers.cached_bytes() >= 64 * SHAPE[1] * 4
