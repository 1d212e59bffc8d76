"""`python -m dgemma.train ...` and `torchrun ... -m dgemma.train ...`: the same as `dgemma train ...`."""

import sys

from dgemma.train.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
