"""Case families on materialised logits ``(N, V)``: cross entropy, softmax, log_softmax, and
their floor, one ``exp`` per element (../shared/PERFORMANCE.md).

Every provider computes the same thing: mean cross entropy over int64 class targets (or
softmax / log_softmax over the last dim with a fixed random incoming gradient), and its
backward writes the gradient of the logits into ``x.grad``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

import crossent
from crossent.testing import Verdict, compare

from .cases import Case, Check, Family, Inputs, register
from .providers import FLOOR, FLOOR_ALLOC, Provider

SCALE = 3.0  # logits ~ N(0, 3²): a spread like a trained LM head's
CHUNK_ELEMENTS = 1 << 22  # row chunk (elements) for input generation and the oracle check
POOL_ELEMENTS = 1 << 24  # normals drawn per input; larger inputs reuse windows of them


def _row_chunks(n: int, v: int) -> Iterator[slice]:
    step = max(1, CHUNK_ELEMENTS // max(v, 1))
    for i in range(0, n, step):
        yield slice(i, min(n, i + step))


def _checked_rows(n: int, v: int, full: bool) -> Iterator[slice]:
    """Row blocks whose output and gradient are compared with the oracle: every row when
    ``full``, else one chunk's worth of single rows spread evenly over ``[0, N)`` (first and
    last included), so that every thread's share of rows is sampled."""
    if full or n * v <= CHUNK_ELEMENTS:
        yield from _row_chunks(n, v)
        return
    k = max(2, CHUNK_ELEMENTS // max(v, 1))
    for i in sorted({round(j * (n - 1) / (k - 1)) for j in range(k)}):
        yield slice(i, i + 1)


def make_logits(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> Tensor:
    """Seeded ``N(0, SCALE²)`` logits of ``shape`` in ``dtype``, identical in every process.

    Drawing 0.5 G normals one by one takes ~5 ns each (torch's seeded generator is serial), so
    large inputs are filled a row chunk at a time from windows, at seeded offsets, of a pool of
    at most ``POOL_ELEMENTS`` normals (a multi-threaded copy): the values are as random as any
    kernel can tell, and no full-size float32 or float64 temporary is made.
    """
    n, v = shape
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(min(n * v, POOL_ELEMENTS), generator=g).mul_(SCALE)
    x = torch.empty(n, v, dtype=dtype)  # (N, V)
    flat = x.view(-1)
    for rows in _row_chunks(n, v):
        size = (rows.stop - rows.start) * v
        off = int(torch.randint(0, pool.numel() - size + 1, (), generator=g))
        flat[rows.start * v : rows.stop * v] = pool[off : off + size]
    return x


def _elem(case: Case) -> int:
    return torch.empty(0, dtype=case.torch_dtype).element_size()


def merge_verdicts(verdicts: list[tuple[str, Verdict]]) -> tuple[bool, str]:
    bad = [f"{what}: {v.message}" for what, v in verdicts if not v.ok]
    return not bad, bad[0] if bad else ""


class _LogitsFamily(Family):
    """Shared parts: inputs ``(N, V)`` logits, floor = ``torch.exp`` over ``N×V`` float32."""

    def floor(self, case: Case) -> Case:
        return Case(ExpFloor.name, case.shape, "float32")

    def not_applicable(self) -> dict[str, str]:
        return {
            # cut-cross-entropy exposes only linear_cross_entropy(embeddings, classifier,
            # targets): it never takes logits. It belongs to a linear-CE family.
            "cut-cross-entropy": "cut-cross-entropy: linear+CE API only (embeddings and "
            "classifier, not logits); it belongs to linear-CE cases",
        }


@register
class CrossEntropy(_LogitsFamily):
    name = "ce"
    description = "cross_entropy(x, target), mean over N, int64 targets; forward+backward"
    # Real vocabularies (Llama 2, Llama 3, ImageNet, Gemma 3); N so that N·V is 0.07–0.5 G.
    shapes = ((4096, 32000), (1024, 128256), (65536, 1000), (2048, 262144))
    quick_shapes = ((256, 1000), (32, 32000))

    def make_inputs(self, case: Case, seed: int = 0) -> Inputs:
        n, v = case.shape
        x = make_logits(case.shape, case.torch_dtype, seed).requires_grad_()  # (N, V)
        g = torch.Generator().manual_seed(seed + 1)
        t = torch.randint(0, v, (n,), generator=g)  # (N,) int64
        return Inputs(args=(x, t), leaves=(x,))

    def torch_fn(self, case: Case) -> Callable[..., Tensor]:
        def fn(x: Tensor, t: Tensor) -> Tensor:
            return F.cross_entropy(x, t)

        return fn

    def crossent_fn(self, case: Case, backend: str) -> Callable[..., Tensor]:
        def fn(x: Tensor, t: Tensor) -> Tensor:
            return crossent.cross_entropy(x, t, backend=backend)  # type: ignore[arg-type]

        return fn

    def min_bytes(self, case: Case) -> int:
        n, v = case.shape
        return 2 * n * v * _elem(case)  # read the logits once, write their gradient once

    def check(self, case: Case, inputs: Inputs, out: Tensor, full: bool = False) -> Check:
        x, t = inputs.args
        n, v = x.shape
        dt = case.torch_dtype
        with torch.no_grad():
            torch_loss = F.cross_entropy(x, t)
            total = torch.zeros((), dtype=torch.float64)
            for rows in _row_chunks(n, v):  # sum of lse - x[target], in float64
                x64 = x[rows].double()
                picked = x64.gather(1, t[rows, None])
                total += (torch.logsumexp(x64, 1) - picked.squeeze(1)).sum()
        out_ok, msg = merge_verdicts([("loss", compare(out.detach(), total / n, torch_loss, dt))])
        grad = x.grad
        if grad is None:
            return Check(out_ok, False, msg or "no gradient in x.grad")
        # The gradient of the mean is (softmax - onehot) / N; compare it times N (exact for
        # power-of-two N) so the per-dtype floor applies to values of magnitude <= 1.
        verdicts = []
        for rows in _checked_rows(n, v, full):
            x64 = x[rows].detach().double().requires_grad_()
            F.cross_entropy(x64, t[rows], reduction="sum").backward()
            xt = x[rows].detach().clone().requires_grad_()
            F.cross_entropy(xt, t[rows], reduction="sum").backward()
            ours = grad[rows].double() * n
            where = f"grad rows {rows.start}:{rows.stop}"
            verdicts.append((where, compare(ours, x64.grad, xt.grad, dt)))
        grad_ok, gmsg = merge_verdicts(verdicts)
        return Check(out_ok, grad_ok, msg or gmsg)


class _SoftmaxFamily(_LogitsFamily):
    log: ClassVar[bool]
    shapes = ((4096, 32000),)
    quick_shapes = ((256, 1000),)

    def make_inputs(self, case: Case, seed: int = 0) -> Inputs:
        x = make_logits(case.shape, case.torch_dtype, seed).requires_grad_()  # (N, V)
        gy = make_logits(case.shape, case.torch_dtype, seed + 7).div_(SCALE)  # (N, V) dL/dy
        return Inputs(args=(x,), leaves=(x,), grad_output=gy)

    def _torch(self, x: Tensor) -> Tensor:
        return F.log_softmax(x, dim=-1) if self.log else F.softmax(x, dim=-1)

    def torch_fn(self, case: Case) -> Callable[..., Tensor]:
        return self._torch

    def crossent_fn(self, case: Case, backend: str) -> Callable[..., Tensor]:
        op: Any = crossent.log_softmax if self.log else crossent.softmax

        def fn(x: Tensor) -> Tensor:
            return op(x, dim=-1, backend=backend)

        return fn

    def min_bytes(self, case: Case) -> int:
        n, v = case.shape
        # forward reads x, writes y; backward reads y and dL/dy, writes dL/dx: 5·N·V·b.
        return 5 * n * v * _elem(case)

    def check(self, case: Case, inputs: Inputs, out: Tensor, full: bool = False) -> Check:
        (x,) = inputs.args
        gy = inputs.grad_output
        assert gy is not None
        n, v = x.shape
        dt = case.torch_dtype
        outs, grads = [], []
        for rows in _checked_rows(n, v, full):
            x64 = x[rows].detach().double().requires_grad_()
            y64 = self._torch(x64)
            y64.backward(gy[rows].double())
            xt = x[rows].detach().clone().requires_grad_()
            yt = self._torch(xt)
            yt.backward(gy[rows])
            where = f"rows {rows.start}:{rows.stop}"
            outs.append((f"output {where}", compare(out[rows].detach(), y64.detach(), yt, dt)))
            if x.grad is not None:
                grads.append((f"grad {where}", compare(x.grad[rows], x64.grad, xt.grad, dt)))
        out_ok, msg = merge_verdicts(outs)
        if x.grad is None:
            return Check(out_ok, False, msg or "no gradient in x.grad")
        grad_ok, gmsg = merge_verdicts(grads)
        return Check(out_ok, grad_ok, msg or gmsg)


@register
class Softmax(_SoftmaxFamily):
    name = "softmax"
    description = "softmax(x, dim=-1); forward+backward with a fixed random dL/dy"
    log = False


@register
class LogSoftmax(_SoftmaxFamily):
    name = "log_softmax"
    description = "log_softmax(x, dim=-1); forward+backward with a fixed random dL/dy"
    log = True


@register
class ExpFloor(Family):
    """One ``exp`` per element: ``torch.exp`` over ``N×V`` float32 into a preallocated output,
    the floor of every family above in any dtype (a lower bound: each contender evaluates at
    least N·V exponentials and writes N·V results). ``floor-alloc`` does the same but allocates
    its output, as each contender allocates its gradient; it is reported beside the floor to
    show what the first-touch page faults of a fresh N×V buffer cost on this machine."""

    name = "exp"
    description = "torch.exp over N×V float32: the one-exp-per-element floor"
    shapes = ()
    quick_shapes = ()
    dtypes = ("float32",)
    listed = False

    def make_inputs(self, case: Case, seed: int = 0) -> Inputs:
        return Inputs(args=(make_logits(case.shape, torch.float32, seed),))  # (N, V)

    def providers(self, case: Case, available: Any = ()) -> list[Provider]:
        return [FLOOR, FLOOR_ALLOC]

    def callable(self, provider: Provider, case: Case) -> Callable[..., Tensor]:
        if provider == FLOOR_ALLOC:
            return torch.exp
        buf = torch.empty(case.shape, dtype=torch.float32)  # (N, V), reused by every call
        return functools.partial(torch.exp, out=buf)

    def torch_fn(self, case: Case) -> Callable[..., Tensor]:
        return torch.exp

    def crossent_fn(self, case: Case, backend: str) -> Callable[..., Tensor]:
        return torch.exp

    def min_bytes(self, case: Case) -> int:
        n, v = case.shape
        return 2 * n * v * 4

    def check(self, case: Case, inputs: Inputs, out: Tensor, full: bool = False) -> Check:
        (x,) = inputs.args
        rows = next(_row_chunks(*x.shape))
        v = compare(out[rows], torch.exp(x[rows].double()), None, torch.float32)
        return Check(v.ok, None, v.message)
