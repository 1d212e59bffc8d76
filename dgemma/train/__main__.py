"""`python -m dgemma.train ...` and `torchrun ... -m dgemma.train ...`: the same as `dgemma train ...`;
`python -m dgemma.train finetune ...` (and torchrun) is `dgemma finetune ...`."""

import sys

from dgemma.cli.main import main

if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(args if args[:1] == ["finetune"] else ["train", *args]))
