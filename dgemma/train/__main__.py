"""`python -m dgemma.train ...` and `torchrun ... -m dgemma.train ...`: the same as `dgemma train ...`."""

import sys

from dgemma.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
