"""`python -m dgemma ...`: the same as the `dgemma` command (see dgemma/cli.py)."""

import sys

from dgemma.cli import main

if __name__ == "__main__":
    sys.exit(main())
