"""Shared test set-up: CPU only, few threads, quiet."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
