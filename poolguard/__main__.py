"""``python -m poolguard``: the same as the ``poolguard`` console script."""

from __future__ import annotations

import sys

from poolguard.cli import main

if __name__ == "__main__":
    sys.exit(main())
