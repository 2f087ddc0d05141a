"""``python -m mtp``: the ``mtp`` command line, for environments without the console script
(e.g. ``python -m mtp demo`` from a checkout on ``PYTHONPATH``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
