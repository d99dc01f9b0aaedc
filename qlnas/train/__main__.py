"""`torchrun --nproc_per_node N -m qlnas.train [train flags]`: one DDP process of a run."""

import sys

from qlnas.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
