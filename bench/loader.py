"""Loader benchmark (torchvision vs stock FFCV vs ours); same as `qlnas bench loader ARGS`."""

import sys

from qlnas.bench.loader import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
