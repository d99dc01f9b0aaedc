"""Shared test set-up: CPU only, few threads, quiet."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
# Numba's LLVM at -O0: each fresh process (every DDP rank, every Ray trial worker) compiles
# FFCV's pipelines in about 10 s instead of 23 s; the tests' batches are tiny, so the slower
# code costs nothing. Inherited by the subprocesses and the local Ray the tests start.
os.environ.setdefault("NUMBA_OPT", "0")
