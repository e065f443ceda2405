"""``crossent bench``: one harness for every speed and memory figure crossent quotes.

Each (case, provider) runs in a fresh child process: inputs are allocated, the call is warmed
up, one call is measured for peak resident memory above the inputs and checked against the
float64 oracle, then ``repeats`` calls are timed. The result is a Markdown table on stdout and
CSV, Markdown and PNG files under ``benchmarks/results/<machine>/``. See benchmarks/README.md.

Layout: :mod:`.cases` (what a case and a family are), :mod:`.logits` (ce, softmax,
log_softmax and their exp floor), :mod:`.providers` (who is measured), :mod:`.worker` (one
measurement in a child), :mod:`.memory` (peak RSS), :mod:`.runner` (CLI and scheduling),
:mod:`.report` (rows, table, CSV, plot).
"""

from __future__ import annotations

from .runner import main

__all__ = ["main"]
