"""Fused linear cross entropy: ``cross_entropy(h @ W.T, target)`` for hidden states ``h``
``(N, D)`` and a classifier ``W`` ``(V, D)``, forward+backward (gradients of h and W).

Providers: crossent, torch eager's matmul + ``F.cross_entropy`` (the baseline), its
``torch.compile``, torch 2.13's ``F.linear_cross_entropy`` on its reference path and with
``LinearCrossEntropyOptions()`` (chunked), and cut-cross-entropy's ``impl="torch_compile"``
where installed. The floor is the three matmuls of that size alone (logits, d(h), d(W)).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import crossent
from crossent.testing import compare

from .cases import Case, Check, Family, Inputs, NotApplicable, register
from .logits import make_logits, merge_verdicts
from .providers import FLOOR, Provider

TORCH_LCE = Provider("torch-linear-ce", "torch-lce", about="F.linear_cross_entropy")
TORCH_LCE_CHUNKED = Provider(
    "torch-linear-ce-chunked",
    "torch-lce-chunked",
    about="F.linear_cross_entropy(options=LinearCrossEntropyOptions())",
)
CHUNK_ROWS = 256  # rows per block of the oracle pass
SAMPLED = 16  # rows of d(h) and of d(W) compared with the oracle


def _inputs(case: Case, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    n, d, v = case.shape
    h = make_logits((n, d), case.torch_dtype, seed).div_(3.0)  # (N, D) ~ N(0, 1)
    w = make_logits((v, d), case.torch_dtype, seed + 1).div_(3.0 * d**0.5)  # (V, D)
    g = torch.Generator().manual_seed(seed + 2)
    t = torch.randint(0, v, (n,), generator=g)  # (N,) int64
    return h, w, t


def _elem(case: Case) -> int:
    return torch.empty(0, dtype=case.torch_dtype).element_size()


def _sample(count: int) -> Tensor:
    return torch.linspace(0, count - 1, min(SAMPLED, count)).round().long().unique()


@register
class LinearCrossEntropy(Family):
    name = "linear_ce"
    description = (
        "linear_cross_entropy(h, W, target): logits h @ W.T, mean over N, int64 targets; "
        "forward+backward (d h, d W)"
    )
    shapes = ((4096, 1024, 32000), (2048, 2048, 128256))
    quick_shapes = ((256, 64, 1000),)

    def make_inputs(self, case: Case, seed: int = 0) -> Inputs:
        h, w, t = _inputs(case, seed)
        h.requires_grad_()
        w.requires_grad_()
        return Inputs(args=(h, w, t), leaves=(h, w))

    def torch_fn(self, case: Case) -> Callable[..., Tensor]:
        def fn(h: Tensor, w: Tensor, t: Tensor) -> Tensor:
            return F.cross_entropy(h @ w.t(), t)

        return fn

    def crossent_fn(self, case: Case, backend: str) -> Callable[..., Tensor]:
        def fn(h: Tensor, w: Tensor, t: Tensor) -> Tensor:
            return crossent.linear_cross_entropy(h, w, t, backend=backend)  # type: ignore[arg-type]

        return fn

    def providers(self, case: Case, available: Iterable[Provider]) -> list[Provider]:
        listed = [p for p in available if p.kind != "floor"]
        return [*listed, TORCH_LCE, TORCH_LCE_CHUNKED]

    def peer_fn(self, provider: Provider, case: Case) -> Callable[..., Tensor]:
        if provider.kind == "torch-lce":
            return lambda h, w, t: F.linear_cross_entropy(h, w, t)
        if provider.kind == "torch-lce-chunked":
            opts = torch.nn.LinearCrossEntropyOptions()
            return lambda h, w, t: F.linear_cross_entropy(h, w, t, options=opts)
        if provider.kind == "cut-cross-entropy":
            from cut_cross_entropy import linear_cross_entropy as cce

            return lambda h, w, t: cce(h, w, t, impl="torch_compile")
        raise NotApplicable(f"{provider.name} has no linear cross entropy")

    def min_bytes(self, case: Case) -> int:
        n, d, v = case.shape
        return 2 * (n * d + v * d) * _elem(case)  # read h and W, write their gradients

    def floor(self, case: Case) -> Case:
        return Case(ThreeMatmuls.name, case.shape, case.dtype)

    def check(self, case: Case, inputs: Inputs, out: Tensor, full: bool = False) -> Check:
        """Against an oracle exact for the operation torch defines: logits rounded to the
        input dtype by ``linear``, everything after them in float64. Checked: the loss, and
        sampled rows of d(h) and of d(W); torch's own values of the same quantities (its
        reference path, in the input dtype) set the tolerance as everywhere."""
        h, w, t = inputs.args
        n, v = h.shape[0], w.shape[0]
        dt = case.torch_dtype
        rows, cols = _sample(n), _sample(v)
        w64, h64 = w.detach().double(), h.detach().double()
        total = torch.zeros((), dtype=torch.float64)
        dh64, dht, dw64, dwt = (
            torch.zeros(len(idx), h.shape[1], dtype=torch.float64)
            for idx in (rows, rows, cols, cols)
        )
        with torch.no_grad():
            for lo in range(0, n, CHUNK_ROWS):
                hi = min(n, lo + CHUNK_ROWS)
                lq = F.linear(h[lo:hi].detach(), w.detach())  # (r, V), the input dtype
                l64 = lq.double()
                lse = torch.logsumexp(l64, 1, keepdim=True)
                total += (lse.squeeze(1) - l64.gather(1, t[lo:hi, None]).squeeze(1)).sum()
                g64 = torch.exp(l64 - lse)
                g64[torch.arange(hi - lo), t[lo:hi]] -= 1.0
                g64 /= n
                with torch.enable_grad():
                    lt = lq.clone().requires_grad_()
                    F.cross_entropy(lt, t[lo:hi], reduction="sum").backward()
                gt = lt.grad / n
                dw64 += g64[:, cols].t() @ h64[lo:hi]
                dwt += (gt[:, cols].t() @ h[lo:hi].detach()).double()
                mine = (rows >= lo) & (rows < hi)
                for k in mine.nonzero().flatten().tolist():
                    r = int(rows[k]) - lo
                    dh64[k] = g64[r] @ w64
                    # as a matrix-vector product: torch's 16-bit CPU matmul with both
                    # operands row-major takes seconds per row on CPUs without 16-bit
                    # matmul instructions
                    dht[k] = (w.detach().t() @ gt[r]).double()
        out_ok, msg = merge_verdicts([("loss", compare(out.detach(), total / n, None, dt))])
        if h.grad is None or w.grad is None:
            return Check(out_ok, False, msg or "no gradient in h.grad or W.grad")
        grad_ok, gmsg = merge_verdicts(
            [
                ("d h (sampled rows)", compare(h.grad[rows], dh64, dht, dt)),
                ("d W (sampled rows)", compare(w.grad[cols], dw64, dwt, dt)),
            ]
        )
        return Check(out_ok, grad_ok, msg or gmsg)


@register
class ThreeMatmuls(Family):
    """The three matmuls of a linear cross entropy alone, in the case's dtype: logits
    ``h @ W.T``, then ``G @ W`` and ``G.T @ h`` with the logits standing in for their gradient
    G. Any implementation computes at least these FLOPs (6·N·D·V)."""

    name = "matmul3"
    description = "h @ W.T, G @ W, G.T @ h: the floor of a linear cross entropy"
    shapes = ()
    quick_shapes = ()
    listed = False

    def make_inputs(self, case: Case, seed: int = 0) -> Inputs:
        h, w, t = _inputs(case, seed)
        return Inputs(args=(h, w, t))

    def providers(self, case: Case, available: Any = ()) -> list[Provider]:
        return [FLOOR]

    def callable(self, provider: Provider, case: Case) -> Callable[..., Tensor]:
        def fn(h: Tensor, w: Tensor, t: Tensor) -> Tensor:
            g = h @ w.t()
            dh = g @ w
            g.t() @ h
            return dh

        return fn

    def torch_fn(self, case: Case) -> Callable[..., Tensor]:
        return self.callable(FLOOR, case)

    def crossent_fn(self, case: Case, backend: str) -> Callable[..., Tensor]:
        return self.callable(FLOOR, case)

    def min_bytes(self, case: Case) -> int:
        n, d, v = case.shape
        return 2 * (n * d + v * d) * _elem(case)

    def check(self, case: Case, inputs: Inputs, out: Tensor, full: bool = False) -> Check:
        return Check(True, None)  # a floor: nothing to compare
