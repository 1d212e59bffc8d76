"""`python -m dgemma.serve ...`: the same as `dgemma serve ...`."""

import sys

from dgemma.serve.main import main

if __name__ == "__main__":
    sys.exit(main())
