"""Backend composition: no backend subclasses another; what a backend lacks, or declines, runs
on the portable torch backend through ``crossent.dispatch`` alone, as its table says."""

from __future__ import annotations

import io

import pytest
import torch

import crossent
from crossent import dispatch
from crossent.backends.base import Backend
from crossent.backends.cpu import CpuBackend
from crossent.backends.reference import ReferenceBackend
from crossent.backends.torch import TorchBackend
from crossent.backends.vocab_parallel import VocabParallelBackend


@pytest.mark.parametrize(
    "cls", [CpuBackend, TorchBackend, ReferenceBackend, VocabParallelBackend],
    ids=lambda c: c.__name__,
)  # fmt: skip
def test_no_backend_subclasses_another(cls: type) -> None:
    assert cls.__mro__ == (cls, Backend, object)


def test_the_table_lists_every_primitive_of_every_backend() -> None:
    rows = dispatch.fallback_table()
    names = {r[0] for r in rows}
    assert {"cpu", "torch", "reference"} <= names
    for name in names:
        assert [r[1] for r in rows if r[0] == name] == list(dispatch.PRIMITIVES)
    how = {(r[0], r[1]): r[2] for r in rows}
    assert how["cpu", "nll_forward"] == "torch"
    assert how["cpu", "cross_entropy_forward"] == "native"
    assert how["cpu", "cross_entropy_prob_forward"].startswith("native; ")
    assert all(how["torch", p] == "native" for p in dispatch.PRIMITIVES)


def test_crossent_check_prints_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    from crossent import check

    monkeypatch.setattr(check, "standard_cases", lambda: [])
    out = io.StringIO()
    assert check.run_check(out, ("cpu",)) == 0
    assert "| cpu       | nll_forward                     | torch |" in out.getvalue()


def test_a_declined_input_runs_on_the_portable_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    # float32 logits with float64 probabilities: the CPU kernels decline, torch's run
    calls: list[str] = []
    original = TorchBackend.cross_entropy_prob_forward

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append("torch")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TorchBackend, "cross_entropy_prob_forward", spy)
    monkeypatch.setattr(dispatch, "_INSTANCES", {})  # composed anew, with the spy
    x = torch.randn(4, 7, requires_grad=True)
    p = torch.softmax(torch.randn(4, 7, dtype=torch.float64), 1)
    ours = crossent.cross_entropy(x, p, backend="cpu")
    assert calls == ["torch"]
    calls.clear()
    crossent.cross_entropy(x, p.float(), backend="cpu")
    assert calls == []  # same precisions: the CPU kernel itself
    theirs = torch.nn.functional.cross_entropy(x.double(), p)
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-6, atol=1e-6)


def test_a_missing_primitive_runs_on_the_portable_backend() -> None:
    be = dispatch.resolve("cpu", torch.zeros(1))
    assert be.name == "cpu"
    assert be.nll_forward.__self__.__class__ is TorchBackend  # type: ignore[attr-defined]
    assert be.cross_entropy_forward.__self__.__class__ is not TorchBackend  # type: ignore[attr-defined]


def test_triton_backend_subclasses_no_other() -> None:
    pytest.importorskip("triton")
    from crossent.backends.triton import TritonBackend

    assert TritonBackend.__mro__ == (TritonBackend, Backend, object)
    assert TritonBackend.defers == {}  # every input of the primitives it has
    native = dispatch.native(TritonBackend())
    assert {"softmax_forward", "softmax_backward", "cross_entropy_forward",
            "cross_entropy_prob_forward", "cross_entropy_partial", "cross_entropy_partial_grad",
            "cross_entropy_prob_partial", "cross_entropy_prob_partial_grad"} <= native  # fmt: skip


def test_the_linear_heads_matmul_policy_is_the_backends() -> None:
    # crossent._linear asks the backend (through dispatch) whether 16-bit products are widened
    # to float32 and how large their slices are: the CPU backend answers from the CPU's
    # instruction set, every other backend never widens and slices large
    x = torch.zeros(2, 3)
    cpu, portable = dispatch.resolve("cpu", x), dispatch.resolve("torch", x)
    assert portable.product_slice_bytes == Backend.product_slice_bytes
    assert not portable.widened_products(torch.bfloat16)
    assert cpu.product_slice_bytes == CpuBackend.product_slice_bytes < Backend.product_slice_bytes
    native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert cpu.widened_products(torch.bfloat16) == (not native_bf16)
    assert not cpu.widened_products(torch.float32)
