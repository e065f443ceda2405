"""A language-model head split over the vocabulary, trained on two ranks, against one process.

    torchrun --nproc-per-node 2 examples/vocab_parallel.py [--steps 20] [--tiny]

Every rank builds the same small model from the same seed: an embedding, a hidden layer and an
LM head of ``--vocab`` classes. The head is split by rows across the ranks (rank r keeps its
slice of the vocabulary); the loss is ``crossent.distributed.vocab_parallel_linear_cross_entropy``
on the hidden states, which every rank holds whole. Beside it, every rank trains an unsplit
copy of the model with ``torch.nn.functional.cross_entropy`` on the full logits, so that rank 0
can print the two losses side by side, step by step, and the largest difference between them.
It runs over gloo on CPU; exits non-zero when the two runs part.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from crossent.distributed import vocab_parallel_linear_cross_entropy


class Model(nn.Module):
    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def hidden_states(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.hidden(self.embed(ids)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=5000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--tiny", action="store_true", help="3 steps, vocab 301, 64 tokens")
    a = ap.parse_args()
    if a.tiny:
        a.steps, a.vocab, a.dim, a.tokens = 3, 301, 16, 64
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    torch.set_num_threads(1)

    whole = Model(a.vocab, a.dim)
    split = copy.deepcopy(whole)
    lo, hi = rank * a.vocab // world, (rank + 1) * a.vocab // world
    split.head.weight = nn.Parameter(whole.head.weight.detach()[lo:hi].clone())
    opt_whole = torch.optim.SGD(whole.parameters(), lr=0.5)
    opt_split = torch.optim.SGD(split.parameters(), lr=0.5)

    g = torch.Generator().manual_seed(1)  # the same batches on every rank
    worst = 0.0
    for step in range(a.steps):
        ids = torch.randint(0, a.vocab, (a.tokens,), generator=g)
        target = torch.roll(ids, -1)
        target[-1] = -100

        loss_whole = F.cross_entropy(whole.head(whole.hidden_states(ids)), target)
        opt_whole.zero_grad()
        loss_whole.backward()
        opt_whole.step()

        h = split.hidden_states(ids)
        loss_split = vocab_parallel_linear_cross_entropy(
            h, split.head.weight, target, vocab_start=lo, vocab_size=a.vocab
        )
        opt_split.zero_grad()
        loss_split.backward()
        opt_split.step()

        diff = abs(loss_whole.item() - loss_split.item())
        worst = max(worst, diff)
        if rank == 0:
            line = f"step {step:3d}  one process {loss_whole.item():.6f}  "
            print(line + f"{world} ranks {loss_split.item():.6f}  |diff| {diff:.1e}", flush=True)
    if rank == 0:
        print(f"largest loss difference over {a.steps} steps: {worst:.2e}")
    dist.destroy_process_group()
    if worst > 1e-4:
        raise SystemExit(f"the split head's losses part from the whole head's ({worst:.2e})")


if __name__ == "__main__":
    main()
