"""`qlnas tensorboard DIR`: TensorBoard over every trial of a search, bound to localhost."""

from __future__ import annotations

import argparse
from pathlib import Path

from qlnas.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tensorboard", help="TensorBoard over the trials of a search (or any run)")
    p.add_argument("dir", help="a search folder (--out of qlnas search) or a training run")
    add_server_arguments(p, port=6006)
    p.add_argument("--tb-flag", action="append", default=[], metavar="NAME=VALUE",
                   help="a TensorBoard flag, e.g. --tb-flag reload_interval=10 (repeatable)")
    p.set_defaults(func=run)


def add_server_arguments(p: argparse.ArgumentParser, port: int) -> None:
    """--port and --host of a local web server (TensorBoard, optuna-dashboard)."""
    p.add_argument("--port", type=int, default=port, help=f"port to serve on (default {port})")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: reach it through ssh -L)")


def logdir_of(folder: str | Path) -> Path:
    """The folder TensorBoard should read: DIR/trials for a search (runs named by trial id)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder (expected the --out folder of a search)")
    trials = folder / "trials"
    return trials if trials.is_dir() else folder


def run(args: argparse.Namespace) -> int:
    import logging

    from tensorboard import default, program
    from tensorboard.plugins import base_plugin

    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: expected 1-65535")
    logdir = logdir_of(args.dir)
    extra = []
    for flag in args.tb_flag:
        name, eq, value = flag.lstrip("-").partition("=")
        if not (name and eq):
            raise UserError(f"--tb-flag {flag!r}: expected NAME=VALUE, e.g. reload_interval=10")
        extra.append(f"--{name}={value}")
    runs = {p.parent for p in logdir.rglob("events.out.tfevents.*")}
    if not getattr(args, "verbose", False):  # qlnas logs at INFO; TensorBoard's INFO is a flood
        for name in ("tensorboard", "werkzeug"):
            logging.getLogger(name).setLevel(logging.WARNING)
    tb = program.TensorBoard(plugins=default.get_plugins())
    try:
        tb.configure(argv=["tensorboard", "--logdir", str(logdir), "--host", args.host,
                           "--port", str(args.port), *extra])
    except (SystemExit, base_plugin.FlagsError) as exc:
        raise UserError(f"--tb-flag {' '.join(args.tb_flag)}: TensorBoard refused it ({exc})") \
            from None
    print(f"TensorBoard over {logdir} ({len(runs)} runs so far; new trials appear as they log)")
    print(f"open http://{args.host}:{args.port}/  (from another machine: "
          f"ssh -L {args.port}:localhost:{args.port} <this host>)", flush=True)
    return int(tb.main() or 0)
