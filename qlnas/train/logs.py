"""Run logs written by the primary process: TensorBoard, metrics.csv, config and run info."""

from __future__ import annotations

import csv
import importlib.metadata
import io
import platform
import subprocess
import sys
from pathlib import Path

import yaml
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from qlnas.fileio import atomic_write_json, atomic_write_text

HPARAM_METRICS = ("val/top1", "val/top5", "val/loss")
LIBRARIES = ("torch", "torchvision", "timm", "ffcv", "numpy", "numba", "ray", "optuna",
             "tensorboard")


def git_revision() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict:
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for lib in LIBRARIES:
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            versions[lib] = None
    return versions


def write_run_info(out: Path, config: dict, extra: dict) -> None:
    """The resolved config, git revision and library versions, next to the logs."""
    atomic_write_text(yaml.safe_dump(config, sort_keys=False), out / "config.yaml")
    atomic_write_json({"git_revision": git_revision(), "versions": library_versions(), **extra},
                      out / "run_info.json")


def write_metrics_csv(history: list[dict], path: Path) -> None:
    if not history:
        return
    columns = list(dict.fromkeys(k for row in history for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(buf.getvalue(), path)


def hparam_values(model_name: str, spec: dict | None, config: dict) -> dict:
    """Flat scalar hyper-parameters (model spec and recipe) for TensorBoard's HParams tab."""
    values: dict = {"model": model_name}
    for key, value in (spec or {}).items():
        if isinstance(value, list | tuple):
            value = "-".join(map(str, value))
        values[f"arch/{key}"] = "none" if value is None else value
    for key in ("epochs", "batch_size", "lr", "warmup_epochs", "schedule", "optimizer",
                "weight_decay", "label_smoothing", "mixup", "cutmix", "ema_decay", "drop_path_rate",
                "resolution", "seed", "on_nan"):
        values[key] = config[key]
    return values


class TBLogger:
    """TensorBoard scalars and an HParams entry for one run (primary process only)."""

    def __init__(self, logdir: Path, hparam_dict: dict, purge_step: int | None = None) -> None:
        """`purge_step`: a resumed run's first step; what the killed run logged from there on
        is dropped (TensorBoard purges it), and its HParams session goes on."""
        self.writer = SummaryWriter(log_dir=str(logdir), purge_step=purge_step)
        # The HParams session: its metrics are the val/* scalars written every epoch, so a
        # run that stops early (diverged, pruned) still shows its last value.
        exp, ssi, self._sei = hparams(hparam_dict, {m: 0.0 for m in HPARAM_METRICS})
        if purge_step is None:
            fw = self.writer._get_file_writer()
            fw.add_summary(exp)
            fw.add_summary(ssi)

    def scalars(self, values: dict, step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer._get_file_writer().add_summary(self._sei)
        self.writer.close()
