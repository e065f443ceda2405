"""Peak resident memory of training steps whose loss is cross entropy over a large vocabulary.

A small model with a 128256-token head (embedding, one hidden layer, the head; 1022 tokens, so
the logits are 500 MiB of float32) trains three AdamW steps after a warm-up step, once with
torch's ``F.cross_entropy``, once with crossent's (default), once with crossent's buffer reuse
on. Each variant runs in a fresh process; it prints the process's resident memory between
steps, the peak during the steps, and the losses (the same in all three).

    python benchmarks/train_step_memory.py
"""

from __future__ import annotations

import subprocess
import sys

import torch
import torch.nn.functional as F

import crossent
from crossent.bench import memory

V, D, N = 128256, 64, 1022


def run(which: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(V, D), torch.nn.Linear(D, D), torch.nn.GELU(), torch.nn.Linear(D, V)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, V, (N + 1,))
    if which == "crossent, reuse on":
        crossent.set_buffer_reuse(True)
    loss_fn = F.cross_entropy if which == "torch" else crossent.cross_entropy

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(ids[:-1]), ids[1:])
        loss.backward()
        opt.step()
        return loss.item()

    step()  # warm-up: the kernels compiled or loaded, the optimizer's state allocated
    memory.release_freed()
    between = memory.rss_bytes()
    if not memory.reset_hwm():
        raise SystemExit("this platform cannot reset the resident-memory high-water mark")
    losses = [step() for _ in range(3)]
    print(
        f"{which:20s} resident between steps {between / 2**20:7,.0f} MiB, peak during steps "
        f"{memory.hwm_bytes() / 2**20:7,.0f} MiB; losses {[round(x, 6) for x in losses]}"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1:
        run(sys.argv[1])
    else:
        for which in ("torch", "crossent", "crossent, reuse on"):
            subprocess.run([sys.executable, __file__, which], check=True)
