"""The `qlnas` command: each concern registers its own sub-command."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from qlnas.errors import UserError

# Sub-command modules; each has `register(subparsers)` and keeps heavy imports in its `run`.
COMMANDS = (
    "qlnas.models.cli",
    "qlnas.data.cli",
    "qlnas.train.cli",
    "qlnas.search.cli",
    "qlnas.symmetry.cli",
    "qlnas.search.tb",
    "qlnas.bench_cli",
    "qlnas.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlnas", description="Train, search and analyse quasi-linear hyperbolic ConvNets.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"qlnas: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qlnas: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
