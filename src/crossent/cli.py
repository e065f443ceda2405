"""Command-line interface: ``crossent {demo,check,bench}`` (also ``python -m crossent``).

Subcommands:

``demo``
    Train the Iris 4-7-3 tanh network with crossent and with torch side by side and print the
    seed worked examples (see :mod:`crossent.demo`).
``check``
    Run crossent's self-check against torch (see :mod:`crossent.check`); the exit status is the
    check's.
``bench``
    Benchmark hook; every argument after ``bench`` is handed to ``crossent.bench.main``.
``warmup``
    Compile the CPU kernels ahead of time into Numba's cache (see :mod:`crossent.warmup`).

Heavy modules (torch, the demo, the check) are imported inside the handlers, so building the
parser and ``--help`` cost nothing beyond importing the ``crossent`` package itself.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

__all__ = ["build_parser", "main"]

PROG = "crossent"


def _version() -> str:
    """The installed distribution's version, or ``"unknown"`` (e.g. when run from a checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("crossent")
    except PackageNotFoundError:
        return "unknown"


class _VersionAction(argparse.Action):
    """Like argparse's ``version`` action, but looks the version up only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> NoReturn:
        print(f"{parser.prog} {_version()}")
        parser.exit(0)


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _cmd_demo(args: argparse.Namespace, rest: list[str]) -> int:
    from crossent.demo import DEFAULT_EPOCHS, run_demo

    epochs = DEFAULT_EPOCHS if args.epochs is None else args.epochs
    run_demo(epochs=epochs, file=sys.stdout)
    return 0


def _cmd_check(args: argparse.Namespace, rest: list[str]) -> int:
    try:
        from crossent.check import run_check
    except ModuleNotFoundError as exc:
        if exc.name != "crossent.check":
            raise
        print("crossent check is not available in this version", file=sys.stderr)
        return 2
    return int(run_check(file=sys.stdout))


def _cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    try:
        from crossent.bench import main as bench_main
    except ImportError:
        print("crossent bench is not available in this version", file=sys.stderr)
        return 2
    return int(bench_main(rest))


def _cmd_warmup(args: argparse.Namespace, rest: list[str]) -> int:
    from crossent.warmup import warmup

    warmup(tuple(args.dtypes))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Build the ``crossent`` argument parser (cheap: imports nothing heavy)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "crossent: drop-in replacements for torch's softmax, log_softmax, nll_loss and "
            "cross_entropy."
        ),
    )
    parser.add_argument(
        "--version", action=_VersionAction, help="print crossent's version and exit"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser(
        "demo",
        help="train an Iris classifier with crossent and torch side by side; worked examples",
        description=(
            "Train the Iris 4-7-3 tanh network three ways (crossent CrossEntropyLoss, torch "
            "CrossEntropyLoss, torch NLLLoss on LogSoftmax) from identical weights and print "
            "the losses side by side, then the seed worked examples."
        ),
    )
    demo.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        metavar="N",
        help="number of full-batch SGD epochs (default: 200)",
    )
    demo.set_defaults(handler=_cmd_demo)

    check = sub.add_parser(
        "check",
        help="check crossent against torch; exit status 0 when everything agrees",
    )
    check.set_defaults(handler=_cmd_check)

    bench = sub.add_parser(
        "bench",
        help="benchmark crossent against torch (arguments are passed through)",
        add_help=False,
        prefix_chars="\0",  # no options of its own: everything goes to crossent.bench
    )
    bench.set_defaults(handler=_cmd_bench)

    warm = sub.add_parser(
        "warmup",
        help="compile the CPU kernels ahead of time (for images and CI caches)",
        description=(
            "Call every function on tiny inputs for each dtype, so that every CPU kernel is "
            "compiled into Numba's on-disk cache (NUMBA_CACHE_DIR chooses where)."
        ),
    )
    warm.add_argument(
        "--dtypes", nargs="+", default=["float32", "bfloat16", "float16", "float64"],
        choices=["float32", "bfloat16", "float16", "float64"], metavar="DTYPE",
        help="dtypes to compile for (default: float32 bfloat16 float16 float64)",
    )  # fmt: skip
    warm.set_defaults(handler=_cmd_warmup)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``crossent`` command line and return its exit status.

    Args:
        argv: Arguments without the program name; ``None`` means ``sys.argv[1:]``.

    Returns:
        The exit status: 0 on success, 2 for usage errors (and an unavailable ``bench``),
        otherwise whatever the subcommand returns.
    """
    parser = build_parser()
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        args, rest = parser.parse_known_args(args_list)
        if rest and args.command != "bench":
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    handler = args.handler
    return int(handler(args, rest))
