"""`qlnas bench kernels|loader|train-step ...`: the benchmarks, from the installed package."""

from __future__ import annotations

import argparse
import importlib

BENCHES = {"kernels": "qlnas.bench.kernels", "loader": "qlnas.bench.loader",
           "train-step": "qlnas.bench.train_step"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark (args after the name go to it)")
    p.add_argument("name", choices=sorted(BENCHES))
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(BENCHES[args.name]).main(args.args) or 0)
