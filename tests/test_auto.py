"""``backend="auto"``: torch's own function on small CPU problems, the fused kernels above
the crossover sizes, never torch's function when a crossent-only option is asked for."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import crossent
import crossent.dispatch as cf
from crossent.testing import make_logits, make_targets


def _is_crossent(t: torch.Tensor) -> bool:
    """Whether ``t`` came out of one of crossent's autograd Functions (through views)."""
    fn = t.grad_fn
    layout = ("ViewBackward0", "UnsafeViewBackward0", "PermuteBackward0", "CloneBackward0")
    while fn is not None and type(fn).__name__ in layout:
        fn = fn.next_functions[0][0]
    return fn is not None and isinstance(fn, torch.autograd.function.BackwardCFunction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_small_cross_entropy_is_torchs_own(reduction: str) -> None:
    x = make_logits((8, 5), requires_grad=True)
    t = make_targets((8,), 5)
    w = torch.rand(5)
    got = crossent.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.2)
    want = F.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.2)
    assert not _is_crossent(got)
    assert torch.equal(got, want)
    g = torch.rand_like(got)
    assert torch.equal(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0])


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_small_nll_loss_is_torchs_own(reduction: str, monkeypatch: pytest.MonkeyPatch) -> None:
    x = make_logits((6, 4, 3), requires_grad=True).log_softmax(1)
    t = make_targets((6, 3), 4)
    got = crossent.nll_loss(x, t, reduction=reduction, ignore_index=2)
    assert not _is_crossent(got)
    assert torch.equal(got, F.nll_loss(x, t, reduction=reduction, ignore_index=2))
    monkeypatch.setattr(cf, "NATIVE_CE_ELEMENTS", x.numel())
    assert _is_crossent(crossent.nll_loss(x, t, reduction=reduction))


def test_large_cross_entropy_uses_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cf, "NATIVE_CE_ELEMENTS", 40)
    x = make_logits((8, 5), requires_grad=True)
    t = make_targets((8,), 5)
    assert _is_crossent(crossent.cross_entropy(x, t))  # 40 logits: not below the bound
    assert not _is_crossent(crossent.cross_entropy(x[:7], t[:7]))


@pytest.mark.parametrize(
    "extra",
    [{"z_loss": 1e-3}, {"softcap": 30.0}, {"temperature": 0.7}, {"inplace_backward": True},
     {"backend": "cpu"}],
    ids=lambda e: next(iter(e)),
)
def test_crossent_options_always_use_crossent(extra: dict) -> None:
    x = make_logits((8, 5), requires_grad=True)
    loss = crossent.cross_entropy(x.clone() if "inplace_backward" in extra else x,
                                  make_targets((8,), 5), **extra)
    assert _is_crossent(loss)


@pytest.mark.parametrize("log", [False, True])
def test_softmax_sizes(log: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    fn = crossent.log_softmax if log else crossent.softmax
    ref = F.log_softmax if log else F.softmax
    x = make_logits((3, 4, 6), requires_grad=True)
    got = fn(x, 1)
    assert not _is_crossent(got) and torch.equal(got, ref(x, 1))
    got16 = fn(x, -1, dtype=torch.float64)
    assert got16.dtype == torch.float64 and torch.equal(got16, ref(x, -1, dtype=torch.float64))
    monkeypatch.setattr(cf, "NATIVE_SOFTMAX_BYTES", x.numel() * x.element_size())
    assert _is_crossent(fn(x, 1))
    assert not _is_crossent(fn(x[:2], 1))


def test_bad_arguments_raise_the_same_at_every_size() -> None:
    # crossent's own checks run before any hand-off, so errors do not depend on the size
    x = make_logits((4, 5))
    with pytest.raises(ValueError, match="z_loss"):
        crossent.cross_entropy(x, make_targets((4,), 5), z_loss=-1.0)
    with pytest.raises(ValueError, match="is not a valid value for reduction"):
        crossent.cross_entropy(x, make_targets((4,), 5), reduction="avg")
    with pytest.raises(IndexError):
        crossent.softmax(x, 2)


def test_hands_off_names_the_rule() -> None:
    small, big = torch.zeros(4, 5), torch.zeros(1, cf.NATIVE_CE_ELEMENTS)
    assert cf.hands_off("cross_entropy", small) and cf.hands_off("nll_loss", small)
    assert not cf.hands_off("cross_entropy", big) and cf.hands_off("softmax", big)
    assert not cf.hands_off("linear_cross_entropy", small)
    assert not cf.hands_off("softmax", torch.zeros(cf.NATIVE_SOFTMAX_BYTES // 4))
    # off the CPU (a meta tensor stands in for a GPU one) torch's own kernels at every size,
    # until the Triton kernels are picked: never the slower portable backend
    gpu = torch.empty(4096, 32000, device="meta")
    for name in ("cross_entropy", "nll_loss", "softmax", "log_softmax"):
        assert cf.hands_off(name, gpu)
    assert not cf.hands_off("linear_cross_entropy", gpu)
    assert cf.auto_name(gpu) == "torch"
