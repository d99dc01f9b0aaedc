"""`qlnas demo`: the main job on the embedded dataset (for now: the model family's table)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job on the embedded dataset")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qlnas.models.cli import run as models_run

    print("Table 1 of the paper, reproduced (parameters at 100 classes):")
    models_run(argparse.Namespace(table1=True, format="md"))
    return 0
