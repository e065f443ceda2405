"""crossent's keyword-only extensions on ``cross_entropy`` and ``linear_cross_entropy``:
``z_loss`` (λ·lse² per kept row), ``softcap`` (c·tanh(x/c)) and ``temperature`` (x / T).

The oracle is :mod:`crossent.reference`; torch has no such options, so "torch's own error"
in the tolerance rule is that of the same loss composed from torch ops in the input dtype
(the capped and scaled logits, ``F.cross_entropy`` and ``logsumexp``). The oracle itself is
checked against that composition in float64.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import crossent
from crossent import dispatch, reference, testing
from crossent.check import composed_cross_entropy

M, V = 13, 37
EXTENSIONS = [
    pytest.param({"z_loss": 1e-2}, id="z"),
    pytest.param({"softcap": 5.0}, id="cap"),
    pytest.param({"temperature": 0.7}, id="temp"),
    pytest.param({"z_loss": 1e-3, "softcap": 4.0, "temperature": 1.3}, id="all"),
]


def composed(
    x: torch.Tensor, t: torch.Tensor, weight: torch.Tensor | None, reduction: str,
    smoothing: float, ignore: int, **ext: Any,
) -> torch.Tensor:
    """The extended loss from torch ops (class dim 1 of 2-D logits): ``crossent check``'s."""
    return composed_cross_entropy(x, t, weight, ignore, reduction, smoothing, **ext)


def grad_output(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(9)
    return (0.5 + torch.rand(shape, generator=g, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("ext", EXTENSIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_oracle_matches_torch_composition_in_float64(
    ext: dict[str, Any], reduction: str, prob: bool
) -> None:
    x = testing.make_logits((M, V), torch.float64)
    t = testing.make_probs((M, V), torch.float64) if prob else testing.make_targets((M,), V)
    if not prob:
        t[::5] = -100
    w = testing.make_weight(V, torch.float64)
    xs = x.clone().requires_grad_()
    out = composed(xs, t, w, reduction, 0.1, -100, **ext)
    go = grad_output(out.shape, torch.float64)
    out.backward(go)
    ours = reference.cross_entropy(x.numpy(), t.numpy(), w.numpy(), -100, reduction, 0.1, **ext)
    g = reference.cross_entropy_grad(
        x.numpy(), t.numpy(), go.numpy(), w.numpy(), -100, reduction, 0.1, **ext
    )
    np.testing.assert_allclose(ours, out.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(g.input, xs.grad.numpy(), rtol=1e-10, atol=1e-12)  # type: ignore[union-attr]


@pytest.mark.parametrize("ext", EXTENSIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("weighted", [False, True], ids=["", "weight"])
def test_cross_entropy_extensions_match_the_oracle(
    backend: str, ext: dict[str, Any], reduction: str, prob: bool, dtype: torch.dtype,
    weighted: bool,
) -> None:
    x = testing.make_logits((M, V), dtype)
    t = testing.make_probs((M, V), dtype) if prob else testing.make_targets((M,), V)
    if not prob:
        t[::5] = -100
    w = testing.make_weight(V, dtype) if weighted else None
    smoothing = 0.1
    xs = x.clone().requires_grad_()
    out = crossent.cross_entropy(xs, t, w, reduction=reduction, label_smoothing=smoothing,
                                 backend=backend, **ext)
    go = grad_output(out.shape, dtype)
    out.backward(go)
    xt = x.clone().requires_grad_()
    theirs = composed(xt, t, w, reduction, smoothing, -100, **ext)
    theirs.backward(go)
    w64 = None if w is None else w.double().numpy()
    args = (x.double().numpy(), t.double().numpy() if prob else t.numpy())
    o = reference.cross_entropy(*args, w64, -100, reduction, smoothing, **ext)
    g = reference.cross_entropy_grad(*args, go.double().numpy(), w64, -100, reduction,
                                     smoothing, **ext)
    assert out.dtype == theirs.dtype and out.shape == theirs.shape
    testing.assert_close_to_oracle(out, o, theirs, what="loss")
    testing.assert_close_to_oracle(xs.grad, g.input, xt.grad, what="grad")  # type: ignore[arg-type]


@pytest.mark.parametrize("ext", EXTENSIONS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_cross_entropy_extensions(
    backend: str, ext: dict[str, Any], reduction: str, dtype: torch.dtype
) -> None:
    n, d = 21, 8
    h = testing.make_logits((n, d), dtype)
    lw = (testing.make_logits((V, d), dtype) / d**0.5)
    t = testing.make_targets((n,), V)
    t[::4] = -100
    results = []
    for lib in ("crossent", "torch"):
        hs, ws = h.clone().requires_grad_(), lw.clone().requires_grad_()
        if lib == "crossent":
            out = crossent.linear_cross_entropy(hs, ws, t, reduction=reduction, backend=backend,
                                                chunk_bytes=5 * V * 4, **ext)
        else:
            out = composed(hs @ ws.t(), t, None, reduction, 0.0, -100, **ext)
        out.backward(grad_output(out.shape, dtype))
        results.append((out.detach(), hs.grad, ws.grad))
    h64, w64 = h.double().requires_grad_(), lw.double().requires_grad_()
    o64 = composed(h64 @ w64.t(), t, None, reduction, 0.0, -100, **ext)
    o64.backward(grad_output(o64.shape, dtype).double())
    for ours, theirs, exact, what in zip(*results, (o64.detach(), h64.grad, w64.grad),
                                         ("loss", "d input", "d weight"), strict=True):
        testing.assert_close_to_oracle(ours, exact, theirs, what=what)


@pytest.mark.parametrize(
    ("kw", "error"),
    [
        ({"z_loss": -1.0}, ValueError), ({"z_loss": float("nan")}, ValueError),
        ({"softcap": 0.0}, ValueError), ({"softcap": -2.0}, ValueError),
        ({"temperature": 0.0}, ValueError), ({"temperature": float("inf")}, ValueError),
        ({"temperature": "hot"}, TypeError), ({"z_loss": True}, TypeError),
    ],
)
def test_bad_extension_values_raise_naming_them(kw: dict[str, Any], error: type) -> None:
    x, t = testing.make_logits((3, 4)), testing.make_targets((3,), 4)
    (name, value), = kw.items()
    with pytest.raises(error, match=name):
        crossent.cross_entropy(x, t, **kw)
    with pytest.raises(error, match=name):
        crossent.linear_cross_entropy(x, testing.make_logits((5, 4)), t, **kw)


def test_defaults_change_nothing(backend: str) -> None:
    x, t = testing.make_logits((6, 9)), testing.make_targets((6,), 9)
    plain = crossent.cross_entropy(x, t, backend=backend)
    same = crossent.cross_entropy(x, t, backend=backend, z_loss=0.0, softcap=None,
                                  temperature=1.0)
    assert torch.equal(plain, same)


@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_softcap_in_the_fused_kernels_at_the_edges(temperature: float, prob: bool) -> None:
    # Rows longer than one kernel block, logits far beyond the cap and infinite ones (which
    # soft-capping makes finite): the fused path against the float64 composition, and the
    # in-place gradient equal to the ordinary one.
    x = testing.make_logits((6, 2500), scale=20.0)
    x[0, 7], x[1, 100], x[2, 2499], x[3, 0] = float("inf"), float("-inf"), 1e30, -1e30
    t = testing.make_targets((6,), 2500)
    t[2] = 2499
    if prob:
        t = testing.make_probs((6, 2500), torch.float32)
    kw: dict[str, Any] = {"softcap": 15.0, "temperature": temperature, "label_smoothing": 0.05}
    xs = x.clone().requires_grad_()
    out = crossent.cross_entropy(xs, t, reduction="none", backend="cpu", **kw)
    go = grad_output(out.shape, torch.float32)
    out.backward(go)
    x64 = x.double().requires_grad_()
    t64 = t.double() if prob else t
    ref = composed(x64, t64, None, "none", 0.05, -100, softcap=15.0, temperature=temperature)
    ref.backward(go.double())
    assert torch.isfinite(out).all() and torch.isfinite(xs.grad).all()  # type: ignore[arg-type]
    torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(xs.grad.double(), x64.grad, rtol=0, atol=2e-7)  # type: ignore[union-attr]
    xi = x.clone().requires_grad_()
    crossent.cross_entropy(xi.clone(), t, reduction="none", backend="cpu", inplace_backward=True,
                           **kw).backward(go)
    assert xi.grad is not None and torch.equal(xi.grad, xs.grad)


def test_crossent_check_covers_the_extensions() -> None:
    # `crossent check` runs every backend on its standard cases, the extensions included, with
    # torch's side of the tolerance rule composed from torch ops
    import io

    from crossent.check import run_check

    out = io.StringIO()
    assert run_check(out) == 0, out.getvalue()
    rows = [r for r in out.getvalue().splitlines() if "z-loss+softcap+temperature" in r]
    assert len(rows) == len(dispatch.available()) * 3  # every backend, three dtypes
    assert all(r.rstrip().endswith("PASS   |") for r in rows)
