"""`torchrun --nproc_per_node N -m qlnas.train [train flags]`: one DDP process of a run."""

import sys

from qlnas.cli import entry

if __name__ == "__main__":
    entry(["train", *sys.argv[1:]])
