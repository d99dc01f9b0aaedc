"""`qlnas train --dry-run`: build everything a run would, time a few steps, and say what the
run will do (steps, learning rates, speed, time, memory) before it is started for real.

The timing runs in this one process at the per-process batch of the planned world size (or
the largest batch that fits in memory); the projection to N processes assumes each runs as
fast as this one.
"""

from __future__ import annotations

import math
import os
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qlnas.errors import UserError
from qlnas.fileio import atomic_path
from qlnas.train.config import TrainConfig
from qlnas.train.memory import free_memory, peak_memory, probe_step

WARMUP_STEPS = 1
"""Untimed steps first: the loader's numba JIT, oneDNN/cuDNN set-up, allocator growth."""
VAL_BATCHES = 2
"""Timed validation batches (after one untimed batch)."""
PROBE_BATCHES = (4, 8)
"""Batches of the two memory probes (one synthetic step each), extrapolated linearly."""
HEADROOM = 0.7
"""The fraction of the free memory a timing may plan to use."""


@dataclass
class Plan:
    """What a run of `config` on `nproc` processes will do, and what a few steps measured."""

    config: TrainConfig
    nproc: int
    device: str
    per_rank_batch: int
    train_samples: int
    val_samples: int
    steps_per_epoch: int
    warmup_steps: int
    lrs: list[float]
    """The LR of every step of the run."""
    resolutions: list[int]
    """The train resolution of every epoch."""
    timed_batch: int = 0
    """The batch the timing ran at: the per-process batch, or less when that will not fit."""
    memory_needed: int | None = None
    """Bytes the per-process batch is predicted to need, when that is more than fits."""
    memory_free: int | None = None
    """Bytes this process can grow to (free memory and its own)."""
    timed_steps: int = 0
    img_per_sec: float = 0.0
    """Training throughput of this one process (0: not measured)."""
    val_img_per_sec: float = 0.0
    """Validation (forward only) throughput of this one process (0: not measured)."""
    startup_seconds: float = 0.0
    """The first train step and the first val batch (loader JIT, kernel set-up)."""
    peak_memory: dict[str, int] = field(default_factory=dict)
    """Bytes: "rss" (resident, the whole process) and on CUDA "cuda" (max allocated)."""
    plot: Path | None = None
    out_holds_run: bool = False

    @property
    def total_steps(self) -> int:
        return len(self.lrs)

    @property
    def val_samples_per_rank(self) -> int:
        return math.ceil(self.val_samples / self.nproc)

    @property
    def val_passes(self) -> int:
        """Evaluations per epoch: the model, and its EMA when there is one."""
        return 2 if self.config.ema_decay > 0 else 1

    def train_seconds(self) -> float | None:
        """Train steps of the whole run; epochs at a lower resolution scaled by pixel count
        (and a timing at a smaller batch by batch size)."""
        if self.img_per_sec <= 0:
            return None
        step = self.per_rank_batch / self.img_per_sec
        full = self.config.resolution ** 2
        return sum(step * self.steps_per_epoch * res ** 2 / full for res in self.resolutions)

    def val_seconds(self) -> float | None:
        if self.val_img_per_sec <= 0:
            return None
        return (self.config.epochs * self.val_passes * self.val_samples_per_rank
                / self.val_img_per_sec)

    def format(self) -> str:
        c = self.config
        procs = f"{self.nproc} process" + ("es" if self.nproc > 1 else "")
        lines = [f"dry run: {c.model}, {c.epochs} epochs on {self.device} "
                 f"({self.train_samples} train / {self.val_samples} val images)"]
        if self.nproc > 1:
            lines.append(f"world size:      {self.nproc} (--nproc {self.nproc}, assumed); "
                         f"timed in 1 process at the per-process batch {self.per_rank_batch} "
                         f"= {c.batch_size} / {self.nproc}")
        else:
            lines.append(f"world size:      1 (--nproc 1); batch {c.batch_size}")
        lines += [f"steps per epoch: {self.steps_per_epoch}",
                  f"total steps:     {self.total_steps}",
                  f"warm-up steps:   {self.warmup_steps} ({c.warmup_epochs:g} epochs, "
                  f"from lr {c.warmup_lr:g} to {c.lr:g})",
                  "", *self._lr_table(), ""]
        if self.memory_needed is not None:
            text = (f"NOT ENOUGH: batch {self.per_rank_batch} per process needs about "
                    f"{_gib(self.memory_needed)} (extrapolated from steps at batch "
                    f"{' and '.join(map(str, PROBE_BATCHES))}), this machine has "
                    f"{_gib(self.memory_free)} free: the run would likely run out of memory "
                    f"(use a smaller --batch-size or more --nproc); timed at batch "
                    f"{self.timed_batch} instead")
            lines += textwrap.wrap(text, 100, initial_indent="memory:          ",
                                   subsequent_indent=" " * 17)
        lines += self._speed_lines(procs)
        if self.plot is not None:
            lines.append(f"lr schedule:     {self.plot}")
        if self.out_holds_run:
            lines.append(f"note: {c.out} already holds a run; a real run needs --resume or "
                         "another --out")
        return "\n".join(lines)

    def _lr_table(self) -> list[str]:
        """The LR at the first step of every epoch and at the last step (steps count from 1,
        as train/lr in TensorBoard)."""
        ramp = len(set(self.resolutions)) > 1
        head = f"{'epoch':>7}  {'step':>8}  {'lr':>12}" + ("  resolution" if ramp else "")
        rows = [f"lr ({self.config.schedule}):", head]
        for epoch in range(self.config.epochs):
            step = epoch * self.steps_per_epoch
            res = f"  {self.resolutions[epoch]:>10}" if ramp else ""
            rows.append(f"{epoch + 1:>7}  {step + 1:>8}  {self.lrs[step]:>12.6g}{res}")
        rows.append(f"{'last':>7}  {self.total_steps:>8}  {self.lrs[-1]:>12.6g}")
        return rows

    def _speed_lines(self, procs: str) -> list[str]:
        c = self.config
        if self.img_per_sec <= 0:
            return ["speed:           not measured (no finite training step)"]
        lines = [f"speed:           {self.img_per_sec:.1f} img/s in 1 process (mean of "
                 f"{self.timed_steps} steps after {WARMUP_STEPS} untimed, batch "
                 f"{self.timed_batch}, resolution {c.resolution})"]
        if self.nproc > 1:
            lines.append(f"projected:       {self.img_per_sec * self.nproc:.1f} img/s over "
                         f"{procs} (assumption: each runs as fast as this one, no "
                         "communication cost)")
        train, val = self.train_seconds(), self.val_seconds()
        ramp = " (epochs below the final resolution scaled by pixel count)" \
            if len(set(self.resolutions)) > 1 else ""
        lines.append(f"estimated time:  train {_duration(train)}{ramp}")
        if val is not None:
            passes = f"{c.epochs} x {self.val_passes}" if self.val_passes > 1 else f"{c.epochs}"
            lines.append(f"                 val {_duration(val)} ({passes} passes of "
                         f"{self.val_samples_per_rank} images per process at "
                         f"{self.val_img_per_sec:.1f} img/s)")
            lines.append(f"                 start-up {_duration(self.startup_seconds)} "
                         "(as measured here: loader JIT, first step)")
            lines.append(f"                 total {_duration(train + val + self.startup_seconds)}")
        memory = [f"{_gib(self.peak_memory['rss'])} resident"]
        if "cuda" in self.peak_memory:
            memory.insert(0, f"{_gib(self.peak_memory['cuda'])} CUDA allocated")
        at = f" at batch {self.timed_batch}" if self.timed_batch != self.per_rank_batch else ""
        lines.append(f"peak memory:     {', '.join(memory)} (per process{at})")
        return lines


def dry_run(config: TrainConfig, nproc: int = 1, steps: int = 5,
            progress_bar: bool = True) -> Plan:
    """Build the run of `config` on `nproc` processes in this process, time `steps` training
    steps, write `out/lr_schedule.png` (nothing else) and return the plan."""
    from qlnas.allocator import keep_freed_memory
    from qlnas.data import beton_info
    from qlnas.train.checkpoint import has_checkpoint
    from qlnas.train.distributed import setup_distributed
    from qlnas.train.fit import build_loaders, make_parts, validate
    from qlnas.train.schedule import lr_curve, warmup_steps

    if steps < 1:
        raise ValueError(f"steps={steps}: expected at least 1 step to time")
    one = "--dry-run runs in one process: use `qlnas train --dry-run --nproc N`, not torchrun"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(one)  # before joining a process group that would wait for the others
    dist = setup_distributed()
    if dist.distributed:  # a group made by the caller
        raise UserError(one)
    if dist.device.type == "cpu":
        keep_freed_memory()  # as the run does: its speed
    torch.manual_seed(config.seed)
    train_path, val_path, num_classes, model = validate(config, nproc)
    per_rank = config.batch_size // nproc
    samples = beton_info(train_path)["samples"]
    spe = _steps_per_epoch(config, samples, nproc, per_rank, train_path)
    lrs = lr_curve(config, spe)
    parts = make_parts(config, model, dist, num_classes, spe)
    parts.progress_bar = progress_bar
    plan = Plan(config=config, nproc=nproc, device=str(dist.device), per_rank_batch=per_rank,
                train_samples=samples, val_samples=beton_info(val_path)["samples"],
                steps_per_epoch=spe, warmup_steps=warmup_steps(config.warmup_epochs, spe),
                lrs=lrs, resolutions=_resolutions(config), timed_batch=per_rank,
                out_holds_run=has_checkpoint(Path(config.out) / "checkpoints" / "last.pt"))
    _fit_memory(plan, parts, num_classes)
    train_loader, val_loader, _ = build_loaders(config.replace(batch_size=plan.timed_batch),
                                                dist, train_path, val_path, parts.model)
    train_startup, plan.timed_steps, plan.img_per_sec = _time_train(parts, train_loader, steps,
                                                                    spe)
    val_startup, plan.val_img_per_sec = _time_val(parts, val_loader)
    plan.startup_seconds = train_startup + val_startup
    plan.peak_memory = peak_memory(dist.device)
    plan.plot = plot_lr(lrs, spe, Path(config.out) / "lr_schedule.png",
                        title=f"{config.model}: {config.epochs} epochs x {spe} steps")
    return plan


def _steps_per_epoch(config: TrainConfig, samples: int, nproc: int, per_rank: int,
                     path: Path) -> int:
    """Steps per epoch of each of `nproc` ranks: every rank reads an equal share (the samples
    left over by `nproc` are dropped) in full batches (drop_last), as the train loader does."""
    steps = samples // nproc // per_rank
    if config.max_steps_per_epoch:
        steps = min(steps, config.max_steps_per_epoch)
    if steps == 0:
        share = f" on each of {nproc} processes" if nproc > 1 else ""
        raise UserError(f"train_data: {path} has fewer samples than one batch of {per_rank}"
                        f"{share}")
    return steps


def _fit_memory(plan: Plan, parts, num_classes: int) -> None:
    """Predict the memory of a step at the per-process batch from two small synthetic steps;
    when it will not fit, time at the largest batch that will (a process killed for memory
    prints no plan)."""
    small, large = PROBE_BATCHES
    free = free_memory(parts.dist.device)
    if plan.per_rank_batch <= large or free is None:
        return
    peaks = [probe_step(parts, b, plan.config.resolution, num_classes) for b in PROBE_BATCHES]
    per_image = max(0.0, (peaks[1] - peaks[0]) / (large - small))
    needed = peaks[1] + per_image * (plan.per_rank_batch - large)
    if needed <= HEADROOM * free:
        return
    fits = large + (HEADROOM * free - peaks[1]) / per_image if per_image > 0 else large
    plan.timed_batch = max(large, min(plan.per_rank_batch - 1, int(fits) // 8 * 8))
    plan.memory_needed, plan.memory_free = int(needed), int(free)


def _resolutions(config: TrainConfig) -> list[int]:
    from qlnas.train.schedule import train_resolution

    return [train_resolution(config, e) for e in range(config.epochs)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_train(parts, loader, steps: int, steps_per_epoch: int) -> tuple[float, int, float]:
    """Training images per second over `steps` steps after the untimed ones, at the final
    resolution (the slowest, and the peak of memory). Returns (seconds of the untimed steps,
    steps timed, img/s); no img/s when a step was not finite."""
    from qlnas.train.engine import Progress, train_one_epoch

    t0 = time.perf_counter()
    progress = Progress()
    train_one_epoch(parts, loader, progress, max_steps=WARMUP_STEPS)
    _sync(parts.dist.device)
    startup = time.perf_counter() - t0
    steps = min(steps, steps_per_epoch, len(loader))
    progress.batch = 0  # a fresh pass over the loader
    metrics = train_one_epoch(parts, loader, progress, max_steps=steps)
    if metrics.get("nonfinite"):
        return startup, 0, 0.0
    return startup, steps, float(metrics["img_per_sec"])


@torch.no_grad()
def _time_val(parts, loader) -> tuple[float, float]:
    """(seconds of the first batch, images per second of up to VAL_BATCHES more) of the
    validation forward pass; 0 img/s when the loader has a single batch."""
    model, device, dtype = parts.model, parts.dist.device, parts.autocast_dtype
    model.eval()
    batches = iter(loader)
    t0 = start = time.perf_counter()
    first, seen = 0.0, 0
    try:
        for i, (images, _) in enumerate(batches):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                model(images)
            _sync(device)
            if i == 0:
                first = time.perf_counter() - start
                t0 = time.perf_counter()
                continue
            seen += images.shape[0]
            if i == VAL_BATCHES:
                break
    finally:
        batches.close()
    elapsed = time.perf_counter() - t0
    return first, (seen / elapsed if seen and elapsed > 0 else 0.0)


def plot_lr(lrs: list[float], steps_per_epoch: int, path: Path, title: str = "") -> Path:
    """LR against step (counted from 1), epoch boundaries marked, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    epochs = len(lrs) // steps_per_epoch
    for epoch in range(1, epochs):
        ax.axvline(epoch * steps_per_epoch + 1, color="0.85", lw=0.6, zorder=0)
    ax.plot(range(1, len(lrs) + 1), lrs, color="tab:blue")
    ax.set_xlim(1, max(len(lrs), 2))
    ax.set_xlabel(f"step ({steps_per_epoch} per epoch; grey lines: epoch boundaries)")
    ax.set_ylabel("learning rate")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
        os.chmod(tmp, 0o644)  # a plot to share, not the temporary file's 0600
    plt.close(fig)
    return path


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "not measured"
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h {m:02d}m"
    return f"{m}m {s:02d}s" if m else f"{s}s"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
