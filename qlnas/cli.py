"""The `qlnas` command: each concern registers its own sub-command."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import typing

from qlnas.errors import UserError

# Sub-command modules; each has `register(subparsers)` and keeps heavy imports in its `run`.
COMMANDS = (
    "qlnas.models.cli",
    "qlnas.data.cli",
    "qlnas.train.cli",
    "qlnas.search.cli",
    "qlnas.symmetry.cli",
    "qlnas.search.tb",
    "qlnas.search.dashboard",
    "qlnas.bench.cli",
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
    return _run(argv)[0]


def _run(argv: list[str] | None) -> tuple[int, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0), args
    except UserError as exc:
        print(f"qlnas: error: {exc}", file=sys.stderr)
        return 2, args
    except KeyboardInterrupt:
        print("qlnas: interrupted", file=sys.stderr)
        return 130, args


def entry(argv: list[str] | None = None) -> typing.NoReturn:
    """The `qlnas` command (and `python -m qlnas.cli`, torchrun's and the launcher's ranks)."""
    code, args = _run(argv)
    if getattr(args, "end_process", False):
        end_process(code)
    sys.exit(code)


def end_process(code: int) -> typing.NoReturn:
    """Exit once logs and output are flushed, skipping the interpreter's teardown.

    A training process has native thread pools (numba's TBB layer under FFCV's loader, gloo's
    workers) whose static destructors abort it if a thread is still running then
    ("terminate called without an active exception"): a finished or cleanly failed run would
    exit 134 instead of its own code. Everything a run writes is closed before this point.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
