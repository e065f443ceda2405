"""One rank of the vocabulary-parallel tests: ``python dist_worker.py RANK WORLD STORE OUT``.

Builds every case of :data:`CASES` for ``WORLD`` ranks (the same inputs on every rank and in
the test that reads the results), computes the loss of this rank's slice of the logits with
``crossent.distributed.vocab_parallel_cross_entropy`` and its gradient, and saves them to
``OUT/rank{RANK}.pt``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from crossent.testing import make_logits, make_probs, make_targets, make_weight


@dataclass(frozen=True)
class Case:
    name: str
    splits: tuple[int, ...]  # classes per rank, in rank order (their sum is C)
    shape: tuple[int, ...]  # the whole logits' shape; class dim 1 (0 when 1-D)
    dtype: torch.dtype = torch.float32
    weighted: bool = False
    ignore_fraction: float = 0.25
    kw: dict[str, Any] = field(default_factory=dict)  # cross_entropy's options
    scale: float = 3.0  # of the logits
    targets: tuple[int, ...] | None = None  # explicit targets (else random)
    special: bool = False  # a NaN logit in row 1; row 3's first slice all -inf
    prob: bool = False  # class probabilities as targets (each rank holds its slice)
    offsets: bool = False  # vocab_start and vocab_size passed (no exchange of slice sizes)

    @property
    def world(self) -> int:
        return len(self.splits)

    @property
    def classes(self) -> int:
        return sum(self.splits)

    @property
    def class_dim(self) -> int:
        return 0 if len(self.shape) == 1 else 1


def build(case: Case, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The whole logits, the targets and the weights of ``case``."""
    c = case.classes
    x = make_logits(case.shape, case.dtype, seed=seed, scale=case.scale)
    tshape = () if len(case.shape) == 1 else case.shape[:1] + case.shape[2:]
    if case.prob:
        t = make_probs(case.shape, case.dtype, seed=seed + 1)
    elif case.targets is not None:
        t = torch.tensor(case.targets, dtype=torch.int64).reshape(tshape)
    else:
        ii = case.kw.get("ignore_index", -100)
        t = make_targets(tshape, c, seed=seed, ignore_index=ii,
                         ignore_fraction=case.ignore_fraction)  # fmt: skip
    w = make_weight(c, case.dtype) if case.weighted else None
    if case.special:
        x[1, 2] = float("nan")
        x[3, : case.splits[0]] = -float("inf")
    return x, t, w


def _cases() -> list[Case]:
    out: list[Case] = []
    # every dtype and reduction, weights and smoothing, on uneven slices over 2 ranks
    for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        for red in ("none", "mean", "sum"):
            for weighted, eps in ((False, 0.0), (True, 0.0), (False, 0.2), (True, 0.2)):
                out.append(Case(
                    f"2r-{str(dt)[6:]}-{red}-w{int(weighted)}-ls{eps}", (5, 8), (6, 13), dt,
                    weighted, kw=dict(reduction=red, label_smoothing=eps),
                ))  # fmt: skip
    out += [
        # 3 ranks, one of them holding no class
        Case("3r-empty-slice", (4, 0, 5), (7, 9), kw=dict(reduction="none")),
        Case("3r-mean-weighted-ls", (3, 4, 5), (9, 12), weighted=True,
             kw=dict(label_smoothing=0.1)),
        # K-dimensional and unbatched input
        Case("2r-3d", (3, 4), (2, 7, 3), kw=dict(reduction="none", label_smoothing=0.1)),
        Case("2r-4d-weighted", (3, 4), (2, 7, 2, 2), weighted=True),
        Case("2r-unbatched", (3, 4), (7,), ignore_fraction=0.0),
        # targets on each slice's edges; an ignore_index that is a class
        Case("3r-edges", (3, 4, 5), (6, 12), targets=(0, 2, 3, 6, 7, 11),
             kw=dict(reduction="none")),
        Case("2r-ignore-a-class", (3, 4), (8, 7), targets=(0, 1, 2, 3, 4, 5, 6, 1),
             kw=dict(ignore_index=1, label_smoothing=0.1)),
        Case("2r-all-ignored", (3, 4), (4, 7), ignore_fraction=1.0),
        Case("2r-all-ignored-sum", (3, 4), (4, 7), ignore_fraction=1.0,
             kw=dict(reduction="sum")),
        # large logits (exp overflows without the shift), the max on either rank
        Case("2r-large-logits", (5, 6), (8, 11), scale=3e4, kw=dict(reduction="none")),
        # NaN spreads to its row only; a slice of only -inf adds nothing to the row's sum
        Case("2r-nan-and-neg-inf", (5, 6), (6, 11), targets=(0, 1, 2, 9, 10, 6),
             special=True, kw=dict(reduction="none")),
        Case("2r-nan-and-neg-inf-mean", (5, 6), (6, 11), targets=(0, 1, 2, 9, 10, -100),
             special=True),
        # crossent's extensions
        Case("2r-z-loss", (5, 6), (6, 11), kw=dict(z_loss=1e-2)),
        Case("2r-softcap", (5, 6), (6, 11), scale=20.0, kw=dict(softcap=10.0, reduction="sum")),
        Case("2r-temperature-bf16", (5, 6), (6, 11), torch.bfloat16,
             kw=dict(temperature=0.7, label_smoothing=0.1, reduction="none")),
        Case("2r-all-extensions", (5, 6), (6, 11), weighted=True,
             kw=dict(z_loss=1e-3, softcap=5.0, temperature=2.0, label_smoothing=0.1)),
        Case("2r-inplace", (5, 6), (6, 11), kw=dict(inplace_backward=True)),
        # one rank: the whole vocabulary
        Case("1r-weighted-ls", (9,), (7, 9), weighted=True, kw=dict(label_smoothing=0.1)),
        Case("1r-prob-offsets", (9,), (7, 9), prob=True, offsets=True),
        # slice offsets given by the caller
        Case("3r-offsets", (4, 0, 5), (7, 9), offsets=True, kw=dict(label_smoothing=0.1)),
    ]
    # probability targets, sliced like the logits
    for dt in (torch.float32, torch.float64):
        out += [
            Case(f"2r-prob-{str(dt)[6:]}", (5, 8), (6, 13), dt, prob=True,
                 kw=dict(reduction="none")),
            Case(f"2r-prob-weighted-ls-{str(dt)[6:]}", (5, 8), (6, 13), dt, weighted=True,
                 prob=True, kw=dict(label_smoothing=0.2)),
        ]  # fmt: skip
    out += [
        Case("3r-prob-empty-slice", (4, 0, 5), (7, 9), prob=True, offsets=True,
             kw=dict(reduction="sum", z_loss=1e-2)),
        Case("2r-prob-3d-extensions", (3, 4), (2, 7, 3), prob=True,
             kw=dict(softcap=5.0, temperature=0.7, label_smoothing=0.1)),
        Case("2r-prob-inplace", (5, 6), (6, 11), prob=True, kw=dict(inplace_backward=True)),
    ]
    return out


CASES = _cases()


@dataclass(frozen=True)
class LinearCase:
    """A language-model head split over the ranks: hidden (N, D), head (V, D)."""

    name: str
    splits: tuple[int, ...]
    rows: int = 9
    dim: int = 6
    dtype: torch.dtype = torch.float32
    weighted: bool = False
    bias: bool = False
    kw: dict[str, Any] = field(default_factory=dict)
    chunk_bytes: int | None = None

    @property
    def world(self) -> int:
        return len(self.splits)

    @property
    def classes(self) -> int:
        return sum(self.splits)


LINEAR_CASES = [
    LinearCase("lin-1r", (11,)),
    LinearCase("lin-2r-none-bias", (5, 8), bias=True, kw=dict(reduction="none")),
    LinearCase("lin-2r-weighted-ls-chunked", (5, 8), weighted=True,
               kw=dict(label_smoothing=0.1), chunk_bytes=64),
    LinearCase("lin-3r-empty-sum", (4, 0, 7), kw=dict(reduction="sum")),
    LinearCase("lin-3r-extensions", (3, 4, 5), bias=True,
               kw=dict(z_loss=1e-2, softcap=4.0, temperature=0.8, label_smoothing=0.1)),
    LinearCase("lin-2r-float64-offsets", (6, 5), dtype=torch.float64, kw=dict(ignore_index=2)),
    LinearCase("lin-2r-bf16", (5, 8), rows=12, dim=8, dtype=torch.bfloat16),
    LinearCase("lin-3r-bf16-bias-ls-chunked", (6, 0, 9), rows=12, dim=8, bias=True,
               dtype=torch.bfloat16, kw=dict(label_smoothing=0.1), chunk_bytes=40),
]  # fmt: skip


def build_linear(case: LinearCase, seed: int):
    """Hidden states, the whole head (and bias), the targets and the class weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.rows, case.dim, generator=g).to(case.dtype)
    w = (torch.randn(case.classes, case.dim, generator=g) * 0.7).to(case.dtype)
    b = torch.randn(case.classes, generator=g).to(case.dtype) if case.bias else None
    t = torch.randint(0, case.classes, (case.rows,), generator=g)
    t[1] = case.kw.get("ignore_index", -100)
    cw = make_weight(case.classes, case.dtype) if case.weighted else None
    return x, w, b, t, cw


def grad_for(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """A non-uniform gradient for 'none' (the same on every rank), else 1 or 0.75."""
    if reduction == "none":
        return make_logits(tuple(loss.shape), loss.dtype, seed=99, scale=1.0)
    return torch.tensor(1.0 if reduction == "mean" else 0.75, dtype=loss.dtype)


def main(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from crossent.distributed import vocab_parallel_cross_entropy

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world)  # fmt: skip
    results = {}
    for i, case in enumerate(CASES):
        if case.world != world:
            continue
        x, t, w = build(case, seed=i)
        lo = sum(case.splits[:rank])
        xs = x.narrow(case.class_dim, lo, case.splits[rank]).clone()
        if case.prob:
            t = t.narrow(case.class_dim, lo, case.splits[rank]).clone()
        leaf = xs.requires_grad_()
        inp = leaf * 1 if case.kw.get("inplace_backward") else leaf  # not a leaf: writable
        kw = dict(case.kw)
        if case.offsets:
            kw.update(vocab_start=lo, vocab_size=case.classes)
        loss = vocab_parallel_cross_entropy(inp, t, w, **kw)
        loss.backward(grad_for(loss, case.kw.get("reduction", "mean")))
        results[case.name] = (loss.detach(), leaf.grad)
    # the same cases as DTensor logits sharded on the class dim (torch.chunk's slices)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import crossent

    mesh = init_device_mesh("cpu", (world,))
    for i, case in enumerate(CASES):
        if case.world != world or case.kw.get("inplace_backward"):
            continue
        x, t, w = build(case, seed=i)
        xd = distribute_tensor(x, mesh, [Shard(case.class_dim)]).requires_grad_()
        td = distribute_tensor(t, mesh, [Shard(case.class_dim)]) if case.prob else t
        wd = None if w is None else distribute_tensor(w, mesh, [Replicate()])
        loss = crossent.cross_entropy(xd, td, wd, **case.kw)
        assert loss.placements == (Replicate(),), loss.placements
        if not any(k in case.kw for k in ("z_loss", "softcap", "temperature")):  # the module
            module = crossent.nn.CrossEntropyLoss(wd, **case.kw)(xd.detach(), td)
            assert torch.equal(module.to_local().nan_to_num(), loss.to_local().nan_to_num())
        loss.to_local().backward(grad_for(loss.to_local(), case.kw.get("reduction", "mean")))
        results["dtensor " + case.name] = (loss.to_local().detach(), xd.grad.full_tensor())

    from crossent.distributed import vocab_parallel_linear_cross_entropy

    for i, lc in enumerate(LINEAR_CASES):
        if lc.world != world:
            continue
        x, w, b, t, cw = build_linear(lc, seed=100 + i)
        lo = sum(lc.splits[:rank])
        ws = w[lo : lo + lc.splits[rank]].clone().requires_grad_()
        bs = None if b is None else b[lo : lo + lc.splits[rank]].clone().requires_grad_()
        xl = x.clone().requires_grad_()
        kw = dict(lc.kw)
        if "offsets" in lc.name:
            kw.update(vocab_start=lo, vocab_size=lc.classes)
        loss = vocab_parallel_linear_cross_entropy(
            xl, ws, t, bias_shard=bs, weight=cw, chunk_bytes=lc.chunk_bytes, **kw
        )
        loss.backward(grad_for(loss, kw.get("reduction", "mean")))
        results[lc.name] = (loss.detach(), xl.grad, ws.grad, None if bs is None else bs.grad)
    dist.barrier()
    dist.destroy_process_group()
    torch.save(results, f"{out}/rank{rank}.pt")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
