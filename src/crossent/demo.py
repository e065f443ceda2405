"""Side-by-side demonstration that crossent is a drop-in replacement for PyTorch's losses.

The demo walks through the standard worked examples of how cross entropy relates to
softmax, log_softmax and the negative log-likelihood:

(a) A 4-7-3 tanh network (``Linear(4, 7) -> tanh -> Linear(7, 3)``) trained on the Iris data set
    with full-batch SGD three ways, from identical initial weights:

    * crossent's ``CrossEntropyLoss`` on logits,
    * torch's ``nn.CrossEntropyLoss`` on logits,
    * torch's ``nn.NLLLoss`` on ``nn.LogSoftmax(dim=1)`` outputs.

    The per-epoch losses of the three runs are printed next to each other.
(b) The 5x3 worked example whose every formulation (softmax + log + nll, log_softmax + nll,
    ``F.log_softmax`` + ``F.nll_loss``, ``F.cross_entropy``) gives 1.4904.
(c) The large-logit batch ``[[1000, 999, 998], [1005, 1002, 1000]]`` with targets ``[0, 0]``,
    where exponentiating before normalising overflows while the fused form does not.
(d) Predicted class probabilities, from logits (softmax) and from log-probabilities (exp).

Everything runs in float32, as those examples do, and needs no network access: the Iris
data ships with the package (``crossent/data/iris.csv``).

Run it with ``python -m crossent demo`` or call :func:`run_demo`.
"""

from __future__ import annotations

import csv
import io
import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Final, NamedTuple, TextIO

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import crossent

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_EPOCHS",
    "DEFAULT_LR",
    "DEFAULT_SEED",
    "LARGE_LOGITS",
    "LARGE_TARGET",
    "WORKED_TARGET",
    "WORKED_X",
    "DemoResult",
    "Formulation",
    "load_iris",
    "run_demo",
]

# crossent's side of every comparison runs the fused CPU kernels: backend="auto" would hand
# problems this small to torch's own functions (faster there), and compare torch with itself.
B: Final = "cpu"

#: Number of full-batch SGD epochs used by default (reaches ~98% training accuracy).
DEFAULT_EPOCHS = 200
#: SGD learning rate.
DEFAULT_LR = 0.5
#: Seed for the (shared) initial weights of the three networks.
DEFAULT_SEED = 0

#: Iris class labels, in the order of the integer codes in ``iris.csv``.
CLASS_NAMES = ("setosa", "versicolor", "virginica")

#: The 5x3 logits of a widely shared worked example (Yang Zhang, 2018, "How is Pytorch's Cross
#: Entropy function related to softmax, log softmax, and NLL"), copied literally.
WORKED_X = (
    (0.9826, 1.0630, -0.4096),
    (-0.6213, 0.2511, 0.5659),
    (0.5662, 0.7360, -0.6783),
    (-0.4638, -1.4961, -1.0877),
    (1.8186, -0.2998, 0.1128),
)
#: The targets of that example.
WORKED_TARGET = (1, 0, 1, 1, 1)
#: The value every formulation prints in that example.
WORKED_EXPECTED = 1.4904

#: The large-logit batch of the numerical-stability example.
LARGE_LOGITS = ((1000.0, 999.0, 998.0), (1005.0, 1002.0, 1000.0))
#: Its targets.
LARGE_TARGET = (0, 0)

#: Iris rows shown in the probability example (d): the first sample of each class.
PROBABILITY_SAMPLES = (0, 50, 100)

# Names of the three training runs, in table order.
RUN_CROSSENT = "crossent CE"
RUN_TORCH_CE = "torch CE"
RUN_TORCH_NLL = "torch NLL"


class Formulation(NamedTuple):
    """One way of computing a loss, evaluated with crossent and with torch.

    ``crossent`` is ``None`` for formulations written by hand from plain tensor operations, which
    involve no library loss function to swap.
    """

    name: str
    crossent: float | None
    torch: float


@dataclass(frozen=True)
class DemoResult:
    """Everything :func:`run_demo` computed, for tests and for programmatic use.

    Attributes:
        epochs: Number of SGD epochs of each training run.
        lr: SGD learning rate.
        losses_crossent: Training loss at every epoch (before that epoch's update) of the run
            using ``crossent.CrossEntropyLoss`` on logits.
        losses_torch_ce: The same for ``torch.nn.CrossEntropyLoss`` on logits.
        losses_torch_nll: The same for ``torch.nn.NLLLoss`` on ``nn.LogSoftmax(dim=1)`` outputs.
        accuracy_crossent: Final training accuracy (fraction in [0, 1]) of the crossent run.
        accuracy_torch_ce: Final training accuracy of the torch CrossEntropyLoss run.
        accuracy_torch_nll: Final training accuracy of the torch NLLLoss run.
        worked_example: Example (b): every formulation of the 5x3 seed example.
        worked_reference: Example (b) computed in float64 with numpy (log-sum-exp).
        large_logit: Example (c): the stable formulations of the large-logit loss.
        large_logit_naive: Example (c): exp, then normalise, then log, then mean (non-finite).
        large_logit_reference: Example (c) computed in float64 with numpy (log-sum-exp).
        probabilities: Example (d): for each source, the class probabilities of the samples
            in ``PROBABILITY_SAMPLES`` (one row of three probabilities per sample).
        seconds: Wall-clock time of the whole demo.
    """

    epochs: int
    lr: float
    losses_crossent: tuple[float, ...]
    losses_torch_ce: tuple[float, ...]
    losses_torch_nll: tuple[float, ...]
    accuracy_crossent: float
    accuracy_torch_ce: float
    accuracy_torch_nll: float
    worked_example: tuple[Formulation, ...]
    worked_reference: float
    large_logit: tuple[Formulation, ...]
    large_logit_naive: float
    large_logit_reference: float
    probabilities: dict[str, tuple[tuple[float, ...], ...]]
    seconds: float

    @property
    def max_abs_diff_crossent_vs_torch(self) -> float:
        """Largest per-epoch |loss difference| between the crossent and torch CE runs."""
        return _max_abs_diff(self.losses_crossent, self.losses_torch_ce)

    @property
    def max_abs_diff_torch_ce_vs_nll(self) -> float:
        """Largest per-epoch |loss difference| between the two torch runs."""
        return _max_abs_diff(self.losses_torch_ce, self.losses_torch_nll)


# --------------------------------------------------------------------------------------------
# Data and model
# --------------------------------------------------------------------------------------------


def load_iris() -> tuple[torch.Tensor, torch.Tensor]:
    """Load the bundled Iris data set (Fisher, 1936).

    Returns:
        ``(features, labels)``: a float32 tensor of shape (150, 4) (sepal length, sepal width,
        petal length, petal width, in cm; not normalised) and an int64 tensor of shape (150,)
        holding 0/1/2 for setosa/versicolor/virginica.
    """
    text = (resources.files("crossent") / "data" / "iris.csv").read_text(encoding="utf-8")
    reader = csv.reader(io.StringIO(text))
    next(reader)  # header
    rows = [row for row in reader if row]
    features = torch.tensor([[float(v) for v in row[:4]] for row in rows], dtype=torch.float32)
    labels = torch.tensor([int(row[4]) for row in rows], dtype=torch.int64)
    return features, labels


def _standardise(features: torch.Tensor) -> torch.Tensor:
    """Z-score every column (computed in float64, returned as float32)."""
    x = features.to(torch.float64)
    return ((x - x.mean(dim=0)) / x.std(dim=0)).to(torch.float32)


class _IrisNet(nn.Module):
    """The 4-7-3 tanh Iris network, optionally ending in a ``LogSoftmax`` module."""

    def __init__(self, log_softmax_output: bool = False) -> None:
        super().__init__()
        self.hid1 = nn.Linear(4, 7)
        self.oupt = nn.Linear(7, 3)
        self.apply_log_soft: nn.Module | None = nn.LogSoftmax(dim=1) if log_softmax_output else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.tanh(self.hid1(x))
        z = self.oupt(z)  # logits
        if self.apply_log_soft is not None:
            z = self.apply_log_soft(z)  # log-probabilities
        return z


def _make_nets(seed: int) -> dict[str, nn.Module]:
    """The three networks, with identical initial weights drawn from ``seed``.

    The global RNG state is left as it was (``nn.Linear`` initialises from the global RNG).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        init = _IrisNet().state_dict()
        nets: dict[str, nn.Module] = {
            RUN_CROSSENT: _IrisNet(),
            RUN_TORCH_CE: _IrisNet(),
            RUN_TORCH_NLL: _IrisNet(log_softmax_output=True),
        }
    for net in nets.values():
        net.load_state_dict(init)
    return nets


@contextmanager
def _single_threaded() -> Iterator[None]:
    """Run torch's CPU ops on one thread for the duration, then restore the thread count.

    The tensors here are tiny (150 x 7 at most), so extra intra-op threads cannot help, and on a
    busy machine their synchronisation makes the demo 10-100x slower (measured: 0.08 s on one
    thread vs 10 s on two threads of a loaded 2-core machine). Results are unaffected.
    """
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _train(
    net: nn.Module,
    loss_fn: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float,
) -> tuple[list[float], float]:
    """Full-batch SGD; returns the loss at each epoch and the final training accuracy.

    The update ``p <- p - lr * grad`` is written out rather than using ``torch.optim.SGD``: it is
    the same arithmetic (``p.add_(grad, alpha=-lr)``, what SGD does without momentum or weight
    decay), and it avoids the ~1 s that the first ``torch.optim`` optimizer spends importing
    ``torch._dynamo``, which would dominate the run time of this sub-second demo.
    """
    params = [p for p in net.parameters() if p.requires_grad]
    losses: list[float] = []
    for _ in range(epochs):
        for p in params:
            p.grad = None
        loss = loss_fn(net(x), y)
        loss.backward()
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-lr)
        losses.append(float(loss.item()))
    with torch.no_grad():
        accuracy = float((net(x).argmax(dim=1) == y).to(torch.float64).mean().item())
    return losses, accuracy


def _max_abs_diff(a: tuple[float, ...] | list[float], b: tuple[float, ...] | list[float]) -> float:
    return max((abs(p - q) for p, q in zip(a, b, strict=True)), default=0.0)


# --------------------------------------------------------------------------------------------
# Worked examples
# --------------------------------------------------------------------------------------------


def _lse_reference(logits: tuple[tuple[float, ...], ...], target: tuple[int, ...]) -> float:
    """Mean cross entropy in float64 with numpy, via the log-sum-exp trick.

    The logits are first rounded to float32 so the reference sees the same inputs as the
    float32 computations it is compared with.
    """
    x = np.asarray(logits, dtype=np.float32).astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    picked = x[np.arange(x.shape[0]), np.asarray(target)]
    return float(np.mean(lse - picked))


def _naive_softmax(x: torch.Tensor) -> torch.Tensor:
    """The textbook softmax: exponentiate, then normalise (overflows for large x)."""
    return x.exp() / (x.exp().sum(-1)).unsqueeze(-1)


def _naive_nl(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The textbook negative likelihood: -mean(log(p[i, target[i]]))."""
    return -probs[range(target.shape[0]), target].log().mean()


def _naive_log_softmax(x: torch.Tensor) -> torch.Tensor:
    """The hand-written log_softmax: x - log(sum(exp(x)))."""
    return x - x.exp().sum(-1).log().unsqueeze(-1)


def _library_formulations(x: torch.Tensor, t: torch.Tensor) -> list[Formulation]:
    """The loss computed through each library API, with crossent and with torch."""

    def val(v: torch.Tensor) -> float:
        return float(v.item())

    return [
        Formulation(
            "softmax -> log -> nll_loss",
            val(crossent.nll_loss(torch.log(crossent.softmax(x, dim=1, backend=B)), t, backend=B)),
            val(F.nll_loss(torch.log(F.softmax(x, dim=1)), t)),
        ),
        Formulation(
            "log_softmax -> nll_loss",
            val(crossent.nll_loss(crossent.log_softmax(x, dim=1, backend=B), t, backend=B)),
            val(F.nll_loss(F.log_softmax(x, dim=1), t)),
        ),
        Formulation(
            "LogSoftmax -> NLLLoss (modules)",
            val(crossent.NLLLoss(backend=B)(crossent.LogSoftmax(dim=1, backend=B)(x), t)),
            val(nn.NLLLoss()(nn.LogSoftmax(dim=1)(x), t)),
        ),
        Formulation(
            "cross_entropy",
            val(crossent.cross_entropy(x, t, backend=B)),
            val(F.cross_entropy(x, t)),
        ),
        Formulation(
            "CrossEntropyLoss (module)",
            val(crossent.CrossEntropyLoss(backend=B)(x, t)),
            val(nn.CrossEntropyLoss()(x, t)),
        ),
    ]


def _worked_example() -> tuple[list[Formulation], float]:
    """Example (b): every formulation of the 5x3 worked example, plus a float64 reference."""
    x = torch.tensor(WORKED_X, dtype=torch.float32)
    t = torch.tensor(WORKED_TARGET, dtype=torch.int64)
    rows = [
        Formulation(
            "by hand: exp/sum -> log -> mean", None, float(_naive_nl(_naive_softmax(x), t))
        ),
        Formulation(
            "by hand: x - log(sum(exp(x)))",
            None,
            float(-_naive_log_softmax(x)[range(t.shape[0]), t].mean()),
        ),
    ]
    rows += _library_formulations(x, t)
    return rows, _lse_reference(WORKED_X, WORKED_TARGET)


def _large_logit_example() -> tuple[list[Formulation], float, float]:
    """Example (c): the large-logit batch, naive (overflowing) and stable formulations."""
    x = torch.tensor(LARGE_LOGITS, dtype=torch.float32)
    t = torch.tensor(LARGE_TARGET, dtype=torch.int64)
    naive = float(_naive_nl(_naive_softmax(x), t))
    return _library_formulations(x, t), naive, _lse_reference(LARGE_LOGITS, LARGE_TARGET)


def _probabilities(
    nets: dict[str, nn.Module], x: torch.Tensor
) -> dict[str, tuple[tuple[float, ...], ...]]:
    """Example (d): class probabilities from logits (softmax) and from log-probs (exp)."""
    rows = x[list(PROBABILITY_SAMPLES)]
    with torch.no_grad():
        cx_logits = nets[RUN_CROSSENT](rows)
        ce_logits = nets[RUN_TORCH_CE](rows)
        nll_logp = nets[RUN_TORCH_NLL](rows)
        sources = {
            "crossent.softmax(logits)": crossent.softmax(cx_logits, dim=1, backend=B),
            "crossent.Softmax(dim=1)(logits)": crossent.Softmax(dim=1, backend=B)(cx_logits),
            "torch softmax(logits)": F.softmax(ce_logits, dim=1),
            "exp(log-probs), torch NLL run": nll_logp.exp(),
        }
    return {
        name: tuple(tuple(float(p) for p in row) for row in probs.tolist())
        for name, probs in sources.items()
    }


# --------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------


def _fmt(v: float | None, width: int = 12, digits: int = 7) -> str:
    """Right-aligned fixed-point number; non-finite values and ``None`` spelled out."""
    if v is None:
        return f"{'-':>{width}}"
    if not math.isfinite(v):
        return f"{v!s:>{width}}"
    return f"{v:>{width}.{digits}f}"


def _print_training(result: DemoResult, out: TextIO) -> None:
    every = max(1, result.epochs // 20)
    shown = sorted({1, result.epochs, *range(every, result.epochs + 1, every)})
    print(
        f"(a) Iris, 4-7-3 tanh network, full-batch SGD (lr={result.lr}), {result.epochs} epochs,",
        file=out,
    )
    print("    identical initial weights; loss per epoch (before that epoch's update)", file=out)
    print(file=out)
    header = (
        f"{'epoch':>7}{RUN_CROSSENT:>14}{RUN_TORCH_CE:>14}{RUN_TORCH_NLL:>14}"
        f"{'|cx - CE|':>13}{'|CE - NLL|':>13}"
    )
    print(header, file=out)
    print("-" * len(header), file=out)
    for epoch in shown:
        i = epoch - 1
        cx, ce, nll = (
            result.losses_crossent[i],
            result.losses_torch_ce[i],
            result.losses_torch_nll[i],
        )
        print(
            f"{epoch:>7}{cx:>14.7f}{ce:>14.7f}{nll:>14.7f}"
            f"{abs(cx - ce):>13.2e}{abs(ce - nll):>13.2e}",
            file=out,
        )
    print("-" * len(header), file=out)
    print(
        f"max |loss difference| over all {result.epochs} epochs: "
        f"crossent vs torch CE {result.max_abs_diff_crossent_vs_torch:.3e}, "
        f"torch CE vs torch NLL {result.max_abs_diff_torch_ce_vs_nll:.3e}",
        file=out,
    )
    print(file=out)
    print("final training accuracy (150 samples):", file=out)
    for name, acc in (
        ("crossent CrossEntropyLoss on logits", result.accuracy_crossent),
        ("torch nn.CrossEntropyLoss on logits", result.accuracy_torch_ce),
        ("torch nn.NLLLoss on nn.LogSoftmax(dim=1)", result.accuracy_torch_nll),
    ):
        print(f"    {name:<42}{acc * 100:>7.2f} %  ({round(acc * 150)}/150)", file=out)


def _print_formulations(rows: tuple[Formulation, ...], out: TextIO) -> None:
    header = f"    {'formulation':<36}{'crossent':>12}{'torch':>12}"
    print(header, file=out)
    print("    " + "-" * (len(header) - 4), file=out)
    for row in rows:
        print(f"    {row.name:<36}{_fmt(row.crossent)}{_fmt(row.torch)}", file=out)


def _print_examples(result: DemoResult, out: TextIO) -> None:
    print(
        f"(b) Worked example: 5x3 logits, targets {list(WORKED_TARGET)}; "
        f"every formulation gives {WORKED_EXPECTED}",
        file=out,
    )
    print(file=out)
    _print_formulations(result.worked_example, out)
    print(
        f"    {'float64 reference (numpy log-sum-exp)':<36}{_fmt(result.worked_reference, 24)}",
        file=out,
    )
    print(file=out)

    print(
        f"(c) Large logits: {[list(r) for r in LARGE_LOGITS]}, "
        f"targets {list(LARGE_TARGET)}",
        file=out,
    )
    print(file=out)
    naive = Formulation("by hand: exp/sum -> log -> mean", None, result.large_logit_naive)
    _print_formulations((naive, *result.large_logit), out)
    print(
        f"    {'float64 reference (numpy log-sum-exp)':<36}"
        f"{_fmt(result.large_logit_reference, 24)}",
        file=out,
    )
    print(file=out)
    print(
        "    The by-hand row exponentiates first: exp(1000) overflows to inf and inf/inf = nan.",
        file=out,
    )
    print(
        "    The library softmax / log_softmax / cross_entropy subtract the row maximum first.",
        file=out,
    )
    print(file=out)

    samples = ", ".join(str(i) for i in PROBABILITY_SAMPLES)
    print(
        f"(d) Predicted class probabilities for samples {samples} after training (one per class)",
        file=out,
    )
    print("    from logits: softmax; from log-probabilities (NLL run): exp", file=out)
    print(file=out)
    cols = "".join(f"{'p(' + c + ')':>15}" for c in CLASS_NAMES)
    header = f"    {'sample':<8}{'source':<32}{cols}{'predicted':>12}"
    print(header, file=out)
    print("    " + "-" * (len(header) - 4), file=out)
    for k, sample in enumerate(PROBABILITY_SAMPLES):
        for j, (name, probs) in enumerate(result.probabilities.items()):
            row = probs[k]
            label = str(sample) if j == 0 else ""
            cells = "".join(f"{p:>15.7f}" for p in row)
            pred = CLASS_NAMES[max(range(len(row)), key=row.__getitem__)]
            print(f"    {label:<8}{name:<32}{cells}{pred:>12}", file=out)
        true = CLASS_NAMES[PROBABILITY_SAMPLES.index(sample)]
        print(f"    {'':<8}(true class: {true})", file=out)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def run_demo(
    epochs: int = DEFAULT_EPOCHS,
    file: TextIO | None = None,
    *,
    lr: float = DEFAULT_LR,
    seed: int = DEFAULT_SEED,
) -> DemoResult:
    """Run the side-by-side demo, print it to ``file`` (default: stdout) and return the numbers.

    Args:
        epochs: Number of full-batch SGD epochs of each training run (must be >= 1).
        file: Text stream to print to; ``None`` means ``sys.stdout`` at call time.
        lr: SGD learning rate.
        seed: Seed for the initial weights, which are shared by the three runs.

    Returns:
        A :class:`DemoResult` with the per-epoch losses, accuracies and example numbers.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    out = sys.stdout if file is None else file
    start = time.perf_counter()

    features, labels = load_iris()
    x = _standardise(features)
    nets = _make_nets(seed)
    loss_fns: dict[str, nn.Module] = {
        RUN_CROSSENT: crossent.CrossEntropyLoss(backend=B),
        RUN_TORCH_CE: nn.CrossEntropyLoss(),
        RUN_TORCH_NLL: nn.NLLLoss(),
    }
    with _single_threaded():
        trained = {name: _train(nets[name], loss_fns[name], x, labels, epochs, lr) for name in nets}
        worked, worked_ref = _worked_example()
        large, naive, large_ref = _large_logit_example()
        probabilities = _probabilities(nets, x)

    result = DemoResult(
        epochs=epochs,
        lr=lr,
        losses_crossent=tuple(trained[RUN_CROSSENT][0]),
        losses_torch_ce=tuple(trained[RUN_TORCH_CE][0]),
        losses_torch_nll=tuple(trained[RUN_TORCH_NLL][0]),
        accuracy_crossent=trained[RUN_CROSSENT][1],
        accuracy_torch_ce=trained[RUN_TORCH_CE][1],
        accuracy_torch_nll=trained[RUN_TORCH_NLL][1],
        worked_example=tuple(worked),
        worked_reference=worked_ref,
        large_logit=tuple(large),
        large_logit_naive=naive,
        large_logit_reference=large_ref,
        probabilities=probabilities,
        seconds=time.perf_counter() - start,
    )

    print("crossent demo: crossent vs torch, side by side (float32)", file=out)
    print("=" * 56, file=out)
    print(file=out)
    _print_training(result, out)
    print(file=out)
    _print_examples(result, out)
    print(file=out)
    print(f"demo finished in {result.seconds:.2f} s", file=out)
    return result
