"""``crossent warmup`` and the first-use compile notice."""

from __future__ import annotations

import io
import subprocess
import sys
import time

import pytest

from crossent.backends.cpu import _runtime


def test_a_slow_compile_is_announced_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_runtime, "NOTICE_AFTER_S", 0.05)
    monkeypatch.setattr(_runtime, "_notice", {"shown": False, "depth": 0})
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)

    def slow(sig: object) -> str:
        time.sleep(0.3)
        return "compiled"

    def fast(sig: object) -> str:
        return "compiled"

    assert _runtime._quiet(fast)(None) == "compiled"
    assert err.getvalue() == ""  # quick: nothing said
    wrapped = _runtime._quiet(slow)
    assert wrapped(None) == "compiled"
    assert wrapped(None) == "compiled"
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and "crossent warmup" in lines[0], lines


def test_warmup_leaves_nothing_to_compile() -> None:
    # after `crossent warmup`, a new process's first calls load every kernel from the cache
    run = subprocess.run(
        [sys.executable, "-m", "crossent", "warmup", "--dtypes", "float32"],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "crossent warmup:" in run.stderr
    probe = """
import torch, crossent
from crossent.backends.cpu import _kernels
x = torch.randn(300, 2000, requires_grad=True)
t = torch.randint(0, 2000, (300,))
crossent.cross_entropy(x, t, backend="cpu").backward()
crossent.cross_entropy(x, t, label_smoothing=0.2, softcap=30.0, backend="cpu").backward()
crossent.log_softmax(x, 1, backend="cpu").sum().backward()
h = torch.randn(64, 16, requires_grad=True)
w = torch.randn(2000, 16, requires_grad=True)
crossent.linear_cross_entropy(h, w, t[:64], backend="cpu").backward()
crossent.linear_token_stats(h, w, t[:64]).logprob.sum().backward()
# at most D tokens: the linear head's transposed layout, with options
crossent.linear_cross_entropy(h[:8], w, t[:8], label_smoothing=0.1, temperature=2.0,
                              backend="cpu").backward()
p = torch.softmax(torch.randn(300, 2000), 1)
crossent.cross_entropy(x, p, softcap=30.0, backend="cpu").backward()
crossent.token_stats(x, t, temperature=0.5).logprob.sum().backward()
# a vocabulary-parallel rank's slice
from crossent.backends.base import RowOptions, merge_index
from crossent.dispatch import resolve
be, o = resolve("cpu", x), RowOptions(label_smoothing=0.1)
parts = be.cross_entropy_partial(x.detach()[:, :700], t, None, o, 0, 2000)
m = merge_index(parts.unsqueeze(0), t, None, o, 2000)
be.cross_entropy_partial_grad(x.detach()[:, :700].contiguous(), t, None, o, 0, 2000, m,
                              torch.empty(300, 700))
from crossent.backends.base import merge_prob
pp = torch.softmax(torch.randn(300, 700), 1)
o = RowOptions(label_smoothing=0.1, temperature=0.7)
mp = merge_prob(be.cross_entropy_prob_partial(x.detach()[:, :700], pp, None, o, 0, 2000)[None], o)
be.cross_entropy_prob_partial_grad(x.detach()[:, :700].contiguous(), pp, None, o, 0, 2000, mp,
                                   torch.empty(300, 700))
from crossent.backends.cpu import _runtime
kernels = [*vars(_kernels).items(), *enumerate(_runtime._specialised.values())]
misses = {k: v.stats.cache_misses for k, v in kernels
          if hasattr(v, "stats") and v.stats.cache_misses}
print("MISSES", misses)
"""
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert "MISSES {}" in res.stdout, res.stdout
