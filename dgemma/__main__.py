"""`python -m dgemma ...`: the same as the `dgemma` command (see dgemma/cli/main.py)."""

import sys

from dgemma.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
