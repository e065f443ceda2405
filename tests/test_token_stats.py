"""``token_stats`` and ``linear_token_stats``: per-token log-probability, entropy, lse and
argmax, against the same quantities composed from torch ops (in float64 as the oracle), with
gradients of the log-probability and the entropy."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

import crossent
from crossent import testing

V = 29


def composed(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
             softcap: float | None = None, temperature: float = 1.0) -> tuple[torch.Tensor, ...]:
    u = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    u = u / temperature
    lp = F.log_softmax(u, -1)
    keep = target != ignore_index
    picked = lp.gather(-1, torch.where(keep, target, 0).unsqueeze(-1)).squeeze(-1)
    logprob = torch.where(keep, picked, 0.0)
    entropy = -(lp.exp() * lp).sum(-1)
    return logprob, entropy, torch.logsumexp(u, -1), u.argmax(-1)


EXT = [pytest.param({}, id="plain"), pytest.param({"softcap": 4.0, "temperature": 0.8}, id="ext")]


@pytest.mark.parametrize("ext", EXT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(11,), (3, 7)], ids=["flat", "batch-time"])
def test_token_stats_match_torch(ext: dict[str, Any], dtype: torch.dtype, shape: tuple) -> None:
    x = testing.make_logits((*shape, V), dtype)
    t = testing.make_targets(shape, V)
    t.view(-1)[::3] = -100
    g = torch.Generator().manual_seed(4)
    g_lp = torch.randn(shape, generator=g).to(dtype)
    g_h = torch.randn(shape, generator=g).to(dtype)
    results = []
    for fn in ("crossent", "torch", "oracle"):
        xs = (x.double() if fn == "oracle" else x.clone()).requires_grad_()
        if fn == "crossent":
            out = crossent.token_stats(xs, t, chunk_bytes=4 * V * 4, **ext)
        else:
            out = composed(xs, t, **ext)
        lp, ent, lse, am = out
        (lp * g_lp.to(lp.dtype) + ent * g_h.to(ent.dtype)).sum().backward()
        results.append((lp.detach(), ent.detach(), lse.detach(), am, xs.grad))
    ours, theirs, exact = results
    for k, what in enumerate(("logprob", "entropy", "lse")):
        assert ours[k].dtype == dtype and ours[k].shape == t.shape
        testing.assert_close_to_oracle(ours[k], exact[k], theirs[k], what=what)
    assert torch.equal(ours[3], exact[3]) or dtype == torch.bfloat16  # ties after rounding
    testing.assert_close_to_oracle(ours[4], exact[4], theirs[4], what="grad")


@pytest.mark.parametrize("ext", EXT)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_token_stats_match_torch(
    ext: dict[str, Any], bias: bool, dtype: torch.dtype
) -> None:
    n, d = 2 * 9, 6
    h = testing.make_logits((2, 9, d), dtype)
    w = testing.make_logits((V, d), dtype) / d**0.5
    b = testing.make_logits((V,), dtype) if bias else None
    t = testing.make_targets((2, 9), V)
    t[0, ::4] = -100
    g = torch.Generator().manual_seed(6)
    g_lp, g_h = torch.randn(2, 9, generator=g), torch.randn(2, 9, generator=g)
    results = []
    for fn in ("crossent", "torch", "oracle"):
        cast = (lambda a: a.double()) if fn == "oracle" else (lambda a: a.clone())
        hs, ws = cast(h).requires_grad_(), cast(w).requires_grad_()
        bs = None if b is None else cast(b).requires_grad_()
        if fn == "crossent":
            out = crossent.linear_token_stats(hs, ws, t, linear_bias=bs, chunk_bytes=5 * V * 4,
                                              **ext)
        else:
            out = composed(F.linear(hs, ws, bs), t, **ext)
        lp, ent = out[0], out[1]
        (lp * g_lp.to(lp.dtype) + ent * g_h.to(ent.dtype)).sum().backward()
        grads = (hs.grad, ws.grad) + (() if bs is None else (bs.grad,))
        results.append((lp.detach(), ent.detach(), out[2], *grads))
    names = ("logprob", "entropy", "lse", "d input", "d weight", "d bias")
    for ours, theirs, exact, what in zip(*results, names, strict=False):
        testing.assert_close_to_oracle(ours, exact, theirs, what=what)
    assert n == t.numel()


def test_logprob_alone_and_no_grad() -> None:
    x = testing.make_logits((5, V), requires_grad=True)
    t = testing.make_targets((5,), V)
    crossent.token_stats(x, t).logprob.sum().backward()
    xt = x.detach().clone().requires_grad_()
    F.log_softmax(xt, -1).gather(1, t[:, None]).sum().backward()
    testing.assert_close_to_oracle(x.grad, xt.grad, dtype=torch.float32)  # type: ignore[arg-type]
    with torch.no_grad():
        s = crossent.token_stats(x, t)
    assert not s.logprob.requires_grad and not s.argmax.is_floating_point()


@pytest.mark.parametrize(
    ("target", "error"),
    [(torch.tensor([0, V]), IndexError), (torch.tensor([0, -2]), IndexError),
     (torch.tensor([0]), ValueError), (torch.tensor([0.0, 1.0]), RuntimeError)],
)
def test_bad_targets_raise(target: torch.Tensor, error: type) -> None:
    x = testing.make_logits((2, V))
    with pytest.raises(error):
        crossent.token_stats(x, target)
    with pytest.raises(error):
        crossent.linear_token_stats(testing.make_logits((2, 4)), testing.make_logits((V, 4)),
                                    target)


@pytest.mark.parametrize("ext", [*EXT, pytest.param({"temperature": 0.8}, id="temp")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernels_match_the_chunked_torch_path_at_the_edges(
    ext: dict[str, Any], dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    # CPU logits go through the fused kernels; the chunked torch-op path (what other devices
    # use) is the reference here for the special rows: NaN, +inf, an all -inf row, values that
    # saturate the cap (ties of u for argmax), rows longer than one kernel block, ignored rows.
    from crossent import _token_stats

    x = testing.make_logits((7, 2300), dtype, scale=4.0)
    x[0, 5] = float("nan")
    x[1, 17] = float("inf")
    x[2] = float("-inf")
    x[3, 100], x[3, 200] = 1e4, 2e4  # both saturate a cap of 4: equal u, argmax the first
    x[4, 2299] = 50.0
    t = testing.make_targets((7,), 2300)
    t[5] = -100
    g = torch.Generator().manual_seed(5)
    g_lp, g_h = torch.randn(7, generator=g).to(dtype), torch.randn(7, generator=g).to(dtype)

    def run() -> tuple[torch.Tensor, ...]:
        xs = x.clone().requires_grad_()
        lp, ent, lse, am = crossent.token_stats(xs, t, **ext)
        (lp * g_lp + ent * g_h).sum().backward()
        return lp.detach(), ent.detach(), lse.detach(), am, xs.grad  # type: ignore[return-value]

    fused = run()
    monkeypatch.setattr(_token_stats, "_fused", lambda x: False)
    chunked = run()
    for a, b in zip(fused, chunked, strict=True):
        assert torch.equal(a.isnan(), b.isnan())
        assert a.dtype == b.dtype
    assert torch.equal(fused[3], chunked[3])  # argmax, NaN and ties included
    tol = {"rtol": 2e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-6}
    for a, b in zip(fused[:3] + fused[4:], chunked[:3] + chunked[4:], strict=True):
        torch.testing.assert_close(a, b, equal_nan=True, **tol)
