"""Running `qlnas train` as a user does, and reading what it left on disk."""

import csv
import os
import signal
import subprocess
import sys
import time

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

TIMING = {"img_per_sec", "epoch_time"}


def train_cmd(out, *args, nproc=1):
    return [sys.executable, "-m", "qlnas.cli", "train", "--out", str(out), "--nproc",
            str(nproc), *args]


def qlnas_train(out, *args, nproc=1, timeout=600):
    return subprocess.run(train_cmd(out, *args, nproc=nproc), capture_output=True, text=True,
                          timeout=timeout)


def metrics(out):
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def untimed(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def tb_scalars(out):
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def tb_summary_tags(out):
    """Every summary tag in every event file, as many times as it was written."""
    tags = []
    for path in sorted((out / "tb").glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            tags += [v.tag for v in event.summary.value]
    return tags


def kill_at_checkpoint(out, args, when, nproc=2, timeout=300):
    """Start a run, SIGKILL it (every process) once `when(state)` holds for last.pt's state."""
    proc = subprocess.Popen(train_cmd(out, *args, nproc=nproc), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    last = out / "checkpoints" / "last.pt"
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if last.is_file():
                try:
                    state = torch.load(last, map_location="cpu", weights_only=False)["state"]
                except (EOFError, RuntimeError, FileNotFoundError):
                    state = None  # replaced while we read it
                if state is not None and when(state):
                    return state
            if proc.poll() is not None:
                raise AssertionError(f"the run ended (exit {proc.returncode}) before the kill")
            time.sleep(0.1)
        raise AssertionError("the awaited checkpoint never appeared")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def largest_relative_difference(a: dict, b: dict) -> float:
    """max over tensors of max|a - b| / max|b| (0 when identical)."""
    worst = 0.0
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if not (torch.is_tensor(x) and x.is_floating_point()):
            assert torch.equal(torch.as_tensor(x), torch.as_tensor(y)), key
            continue
        scale = y.abs().max().item() or 1.0
        worst = max(worst, (x - y).abs().max().item() / scale)
    return worst
