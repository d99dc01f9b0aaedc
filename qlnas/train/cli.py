"""`qlnas train`: train one variant on this node, in-process or as N DDP processes."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import typing

import yaml

from qlnas.errors import UserError

ALIASES = {"train_data": ["--train"], "val_data": ["--val"]}


def _parse_kv(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (only given flags override recipe and file)."""
    from qlnas.train.config import TrainConfig, field_docs

    hints = typing.get_type_hints(TrainConfig)
    docs = field_docs(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "arch":
            continue
        flags = ["--" + f.name.replace("_", "-")] + ALIASES.get(f.name, [])
        kind = typing.get_args(hints[f.name]) or (hints[f.name],)
        kind = next(t for t in kind if t is not type(None))
        doc = docs.get(f.name, "")
        if kind is bool:
            p.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=doc)
        else:
            p.add_argument(*flags, dest=f.name, type=kind, default=argparse.SUPPRESS, help=doc)
    p.add_argument("--arch", action="append", type=_parse_kv, default=[], metavar="KEY=VALUE",
                   help="ArchSpec override for qlnet models, e.g. --arch form=eq4 (repeatable)")
    p.add_argument("--recipe", choices=("demo", "paper"), default=None,
                   help="start from a shipped recipe (default: demo when no --config)")
    p.add_argument("--config", default=None, help="YAML file of TrainConfig keys")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a variant (DDP with --nproc N)")
    add_train_arguments(p)
    p.add_argument("--nproc", type=int, default=1, help="DDP processes on this node")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    p.add_argument("--dry-run", nargs="?", type=int, const=5, default=None, metavar="STEPS",
                   help="build the run, time STEPS training steps (default 5) in this process "
                        "and print the plan (steps, LR per epoch, img/s, time, memory); writes "
                        "only OUT/lr_schedule.png")
    # A finished run's process ends without the interpreter's teardown (qlnas.cli.entry).
    p.set_defaults(func=run, end_process=True)


def config_from_args(args: argparse.Namespace):
    from qlnas.train.config import TrainConfig, resolve_config

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names and k != "arch"}
    if args.arch:
        overrides["arch"] = dict(args.arch)
    recipe = args.recipe or (None if args.config else "demo")
    return resolve_config(recipe, args.config, overrides)


def run(args: argparse.Namespace) -> int:
    from qlnas.train.fit import EXIT_CODES, fit, validate

    if args.nproc < 1:
        raise UserError(f"--nproc={args.nproc}: expected a positive integer")
    if args.dry_run is not None and args.dry_run < 1:
        raise UserError(f"--dry-run {args.dry_run}: expected at least 1 step to time")
    config = config_from_args(args)
    if args.dry_run is not None:
        return dry_run(config, args.nproc, args.dry_run)
    if args.nproc > 1 and "RANK" not in os.environ:
        validate(config, args.nproc)  # report bad input once, before any process starts
        return launch(config, args.nproc, args.resume)
    result = fit(config, resume=args.resume)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"{result['status']}: {result['epochs_run']} epochs, val top1 "
              f"{result.get('val_top1', 0.0):.4f} (best {result['best_top1']:.4f}), "
              f"run in {result['out']}")
    return EXIT_CODES[result["status"]]


def dry_run(config, nproc: int, steps: int) -> int:
    """The plan of `config` on `nproc` processes, measured in this one process."""
    from qlnas.train.plan import dry_run as plan_run

    print(plan_run(config, nproc, steps).format())
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config, nproc: int, resume: bool) -> int:
    """Run `config` as `nproc` DDP processes on this node (torchrun's variables); rank 0's exit
    code is the job's. A process that fails stops the others."""
    with tempfile.TemporaryDirectory(prefix="qlnas-launch-") as tmp:
        path = os.path.join(tmp, "config.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(config.to_dict(), f)
        argv = ["train", "--config", path] + (["--resume"] if resume else [])
        return _spawn(argv, nproc)


def _spawn(argv: list[str], nproc: int) -> int:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc))
    procs = []
    for rank in range(nproc):
        penv = dict(env, RANK=str(rank), LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen([sys.executable, "-m", "qlnas.cli", *argv], env=penv))

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = _wait_all(procs)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return codes[0] if codes[0] != 0 else max(codes, key=abs)


def _wait_all(procs: list[subprocess.Popen]) -> list[int]:
    while any(p.poll() is None for p in procs):
        failed = [p for p in procs if p.poll() not in (None, 0)]
        if failed:
            time.sleep(5)  # let the others see the same failure (e.g. a diverged run)
            for p in procs:
                if p.poll() is None:
                    p.terminate()
        time.sleep(0.2)
    return [p.returncode for p in procs]
