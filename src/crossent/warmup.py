"""``crossent warmup``: compile the CPU kernels ahead of time, into Numba's on-disk cache.

A kernel is compiled the first time a process calls it with a new combination of dtypes
(seconds each) and loaded from the cache afterwards. :func:`warmup` calls every public
function on tiny inputs over the dtypes, target kinds, class weights, options (label
smoothing, temperature, soft-cap, z-loss: the cross-entropy and token-statistics kernels are
compiled per set), a vocabulary-parallel rank's slice, the linear head's two layouts (a
chunk's logits by rows, or transposed when there are at most as many tokens as features) and
gradient settings that select distinct kernels, so that a container image or a CI cache built
with it never compiles at training time. Set ``NUMBA_CACHE_DIR`` to choose where the cache
goes (it is read-only afterwards if need be).
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from typing import IO

import torch

DTYPES = ("float32", "bfloat16", "float16", "float64")


def _calls(dtype: torch.dtype) -> list[tuple[str, Callable[[], object]]]:
    import crossent

    g = torch.Generator().manual_seed(0)
    v, n, d = 37, 6, 5

    def x(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g).to(dtype).requires_grad_()

    t = torch.randint(0, v, (n,), generator=g)
    p = torch.softmax(torch.randn(n, v, generator=g), 1).to(dtype)
    w = torch.rand(v, generator=g).to(dtype)

    def backward(out: object) -> None:
        loss = out if isinstance(out, torch.Tensor) else out[0]  # type: ignore[index]
        loss.float().sum().backward()

    def ce(weight: torch.Tensor | None, red: str, prob: bool) -> None:
        target = p if prob else t
        backward(crossent.cross_entropy(x(n, v), target, weight, reduction=red, backend="cpu"))
        crossent.cross_entropy(x(n, v).detach(), target, weight, reduction=red, backend="cpu")

    def ce_options(
        smoothing: float, softcap: float | None, temperature: float, z_loss: float
    ) -> None:
        # the class-index kernel is compiled per set of options (crossent.backends.cpu)
        backward(crossent.cross_entropy(
            x(n, v), t, label_smoothing=smoothing, z_loss=z_loss, softcap=softcap,
            temperature=temperature, backend="cpu",
        ))  # fmt: skip

    def transformed(kind: str, softcap: float | None, temperature: float) -> None:
        # probability targets and token statistics: a kernel per transform of the logits
        if kind == "probabilities":
            backward(crossent.cross_entropy(
                x(n, v), p, softcap=softcap, temperature=temperature, backend="cpu"
            ))  # fmt: skip
        else:
            backward(crossent.token_stats(x(n, v), t, softcap=softcap, temperature=temperature))

    def linear_columns(smoothing: float, softcap: float | None, temperature: float) -> None:
        # at most D tokens: the chunk's logits transposed (kernels per smoothing and transform)
        backward(crossent.linear_cross_entropy(
            x(d - 1, d), x(v, d), t[: d - 1], label_smoothing=smoothing, softcap=softcap,
            temperature=temperature, backend="cpu",
        ))  # fmt: skip

    def vocab_slice(smoothing: float, softcap: float | None, temperature: float) -> None:
        # a slice of the classes (vocab-parallel ranks): partial statistics, then the gradient
        from crossent.backends.base import RowOptions, merge_index
        from crossent.dispatch import resolve

        xs = x(n, v).detach()
        opts = RowOptions(label_smoothing=smoothing, softcap=softcap, temperature=temperature)
        be = resolve("cpu", xs)
        parts = be.cross_entropy_partial(xs, t, None, opts, 0, v)
        merged = merge_index(parts.unsqueeze(0), t, None, opts, v)
        be.cross_entropy_partial_grad(xs, t, None, opts, 0, v, merged, torch.empty_like(xs))

    def prob_slice(softcap: float | None, temperature: float) -> None:
        # a slice of the classes with probability targets sliced like the logits
        from crossent.backends.base import RowOptions, merge_prob
        from crossent.dispatch import resolve

        xs = x(n, v).detach()
        opts = RowOptions(label_smoothing=0.1, softcap=softcap, temperature=temperature)
        be = resolve("cpu", xs)
        merged = merge_prob(be.cross_entropy_prob_partial(xs, p, None, opts, 0, v)[None], opts)
        be.cross_entropy_prob_partial_grad(xs, p, None, opts, 0, v, merged, torch.empty_like(xs))

    def nll(weight: torch.Tensor | None) -> None:
        backward(crossent.nll_loss(x(n, v), t, weight, backend="cpu"))

    def linear(weight: torch.Tensor | None, red: str) -> None:
        backward(crossent.linear_cross_entropy(x(n, d), x(v, d), t, weight=weight,
                                               reduction=red, backend="cpu"))  # fmt: skip

    def softmax(log: bool) -> None:
        backward((crossent.log_softmax if log else crossent.softmax)(x(n, v), 1, backend="cpu"))

    def stats(fused_head: bool) -> None:
        if fused_head:
            backward(crossent.linear_token_stats(x(n, d), x(v, d), t))
        else:
            backward(crossent.token_stats(x(n, v), t))

    calls: list[tuple[str, Callable[[], object]]] = []
    for weight in (None, w):
        tag = f"weight={weight is not None}"
        for red in ("mean", "none"):
            calls.append((f"cross_entropy {red} {tag}", functools.partial(ce, weight, red, False)))
            calls.append((f"cross_entropy probabilities {red} {tag}",
                          functools.partial(ce, weight, red, True)))  # fmt: skip
            calls.append((f"linear_cross_entropy {red} {tag}",
                          functools.partial(linear, weight, red)))  # fmt: skip
        calls.append((f"nll_loss {tag}", functools.partial(nll, weight)))
    transforms = (("", None, 1.0), (" temperature", None, 0.7), (" softcap", 20.0, 1.0))
    for smoothing in (0.0, 0.1):
        for label, cap, temp in transforms:
            for z_loss in (0.0, 1e-4):
                if smoothing or label or z_loss:
                    name = f"cross_entropy smoothing={smoothing}{label} z_loss={z_loss}"
                    calls.append((name, functools.partial(ce_options, smoothing, cap, temp,
                                                          z_loss)))  # fmt: skip
            name = f"linear_cross_entropy by columns smoothing={smoothing}{label}"
            calls.append((name, functools.partial(linear_columns, smoothing, cap, temp)))
            name = f"vocab-parallel slice smoothing={smoothing}{label}"
            calls.append((name, functools.partial(vocab_slice, smoothing, cap, temp)))
    for label, cap, temp in transforms[1:]:
        for kind in ("probabilities", "token_stats"):
            calls.append((f"{kind}{label}", functools.partial(transformed, kind, cap, temp)))
    for label, cap, temp in transforms:
        calls.append((f"vocab-parallel slice probabilities{label}",
                      functools.partial(prob_slice, cap, temp)))  # fmt: skip
    calls += [("softmax", functools.partial(softmax, False)),
              ("log_softmax", functools.partial(softmax, True)),
              ("token_stats", functools.partial(stats, False)),
              ("linear_token_stats", functools.partial(stats, True))]  # fmt: skip
    return calls


def warmup(dtypes: tuple[str, ...] = DTYPES, file: IO[str] | None = sys.stderr) -> int:
    """Compile (or load) every CPU kernel for ``dtypes``; prints progress to ``file``.
    Returns the number of calls made."""
    out = file
    plan = [(dt, name, call) for dt in dtypes for name, call in _calls(getattr(torch, dt))]
    start = time.perf_counter()
    for i, (dt, name, call) in enumerate(plan, 1):
        t0 = time.perf_counter()
        call()
        if out is not None:
            took = time.perf_counter() - t0
            print(f"[{i:3d}/{len(plan)}] {dt:9s} {name:45s} {took:6.1f}s", file=out, flush=True)
    if out is not None:
        print(f"crossent warmup: {len(plan)} calls in {time.perf_counter() - start:.0f}s",
              file=out)  # fmt: skip
    return len(plan)
