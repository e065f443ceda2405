"""``python -m crossent``: the ``crossent`` command line (see :mod:`crossent.cli`)."""

from __future__ import annotations

from crossent.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
