"""``token_stats`` and ``linear_token_stats``: per-token log-probability, entropy, lse and
argmax, against the same quantities composed from torch ops (in float64 as the oracle), with
gradients of the log-probability and the entropy."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crossent
from crossent import dispatch, testing

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
    ext: dict[str, Any], dtype: torch.dtype
) -> None:
    # The cpu backend's fused kernels against the portable backend's chunked torch operations
    # (what other devices use) on the special rows: NaN, +inf, an all -inf row, values that
    # saturate the cap (ties of u for argmax), rows longer than one kernel block, ignored rows.
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

    def run(backend: str) -> tuple[torch.Tensor, ...]:
        xs = x.clone().requires_grad_()
        lp, ent, lse, am = crossent.token_stats(xs, t, **ext, backend=backend)
        (lp * g_lp + ent * g_h).sum().backward()
        return lp.detach(), ent.detach(), lse.detach(), am, xs.grad  # type: ignore[return-value]

    fused = run("cpu")
    chunked = run("torch")
    for a, b in zip(fused, chunked, strict=True):
        assert torch.equal(a.isnan(), b.isnan())
        assert a.dtype == b.dtype
    assert torch.equal(fused[3], chunked[3])  # argmax, NaN and ties included
    tol = {"rtol": 2e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-6}
    for a, b in zip(fused[:3] + fused[4:], chunked[:3] + chunked[4:], strict=True):
        torch.testing.assert_close(a, b, equal_nan=True, **tol)


TRITON = pytest.mark.skipif("triton" not in dispatch.available(), reason="triton not usable")
BACKENDS = ["cpu", "torch", "reference", pytest.param("triton", marks=TRITON)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ext", EXT)
def test_every_backend_matches_the_float64_oracle(backend: str, ext: dict[str, Any]) -> None:
    # values and the gradient of Σ g_lp·logprob + g_h·entropy against crossent.reference's
    # token statistics, for logits and for a linear head; chunks of 3 rows (several chunks)
    from crossent import reference

    x = testing.make_logits((11, 37), torch.float64, scale=3.0)
    t = testing.make_targets((11,), 37)
    t[4] = -100
    g = torch.Generator().manual_seed(2)
    g_lp, g_h = torch.randn(11, generator=g, dtype=torch.float64), torch.randn(
        11, generator=g, dtype=torch.float64
    )
    cap, temp = ext.get("softcap"), ext.get("temperature", 1.0)
    want = reference.token_stats(x.numpy(), t.numpy(), -100, cap, temp)
    want_g = reference.token_stats_grad(x.numpy(), t.numpy(), g_lp.numpy(), g_h.numpy(), -100,
                                        cap, temp)  # fmt: skip
    xs = x.clone().requires_grad_()
    got = crossent.token_stats(xs, t, **ext, backend=backend, chunk_bytes=3 * 37 * 4)
    (got.logprob * g_lp + got.entropy * g_h).sum().backward()
    for a, b in zip(got[:3], want[:3], strict=True):
        torch.testing.assert_close(a, torch.from_numpy(b), rtol=1e-12, atol=1e-12)
    assert torch.equal(got.argmax, torch.from_numpy(want[3]))
    torch.testing.assert_close(xs.grad, torch.from_numpy(want_g), rtol=1e-12, atol=1e-12)

    h = testing.make_logits((11, 6), torch.float64).requires_grad_()
    w = testing.make_logits((37, 6), torch.float64).requires_grad_()
    lin = crossent.linear_token_stats(h, w, t, **ext, backend=backend, chunk_bytes=4 * 37 * 8)
    (lin.logprob * g_lp + lin.entropy * g_h).sum().backward()
    logits = (h @ w.T).detach().numpy()
    want = reference.token_stats(logits, t.numpy(), -100, cap, temp)
    dl = torch.from_numpy(reference.token_stats_grad(
        logits, t.numpy(), g_lp.numpy(), g_h.numpy(), -100, cap, temp))  # fmt: skip
    for a, b in zip(lin[:3], want[:3], strict=True):
        torch.testing.assert_close(a, torch.from_numpy(b), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h.grad, dl @ w.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.grad, dl.T @ h.detach(), rtol=1e-12, atol=1e-12)


def test_the_oracle_matches_torch() -> None:
    # crossent.reference.token_stats(_grad) against torch's log_softmax in float64
    from crossent import reference

    x = testing.make_logits((5, 4, 9), torch.float64, scale=3.0).requires_grad_()
    t = testing.make_targets((5, 4), 9)
    t[1, 2] = -100
    lp = torch.log_softmax(x, -1)
    keep = t != -100
    logprob = torch.where(keep, lp.gather(-1, t.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
    entropy = -(lp.exp() * lp).sum(-1)
    g_lp, g_h = torch.rand(5, 4, dtype=torch.float64), torch.rand(5, 4, dtype=torch.float64)
    (logprob * g_lp + entropy * g_h).sum().backward()
    got = reference.token_stats(x.detach().numpy(), t.numpy())
    np_g = reference.token_stats_grad(x.detach().numpy(), t.numpy(), g_lp.numpy(), g_h.numpy())
    for a, b in zip(got, (logprob, entropy, torch.logsumexp(x, -1), x.argmax(-1)), strict=True):
        a = torch.from_numpy(np.asarray(a))
        torch.testing.assert_close(a, b.detach(), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(torch.from_numpy(np_g), x.grad, rtol=1e-13, atol=1e-13)
