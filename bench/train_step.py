"""Train-step and inference speed of the Table 1 models vs resnet50 (`make bench`).

Thin wrapper: `python bench/train_step.py --help` (same as `qlnas bench train-step`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlnas.bench.train_step import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
