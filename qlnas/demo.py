"""`qlnas demo`: the main job on the embedded dataset: a small architecture search."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="search the QL-ConvNet space on the embedded digits")
    p.add_argument("--out", default=None, help="search folder (default runs/demo-<time>)")
    p.set_defaults(func=run)


def space_path() -> Path:
    """search_spaces/demo.yaml of this checkout."""
    return Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"


def search_args(out: str) -> argparse.Namespace:
    """The `qlnas search` arguments of the demo, parsed by that command's own parser (so every
    option it reads has its default)."""
    from qlnas.search.cli import add_search_arguments

    parser = argparse.ArgumentParser(prog="qlnas search")
    add_search_arguments(parser)
    return parser.parse_args(["--space", str(space_path()), "--out", out])


def run(args: argparse.Namespace) -> int:
    from qlnas.search.cli import run_search_cmd

    out = args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"qlnas demo: searching {space_path().name} on the embedded digits into {out}")
    return run_search_cmd(search_args(out))
