"""``python -m crossent.bench ARGS`` is ``crossent bench ARGS``."""

from __future__ import annotations

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
