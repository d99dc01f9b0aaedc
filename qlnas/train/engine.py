"""One training epoch and one evaluation, each returning a dict of metrics."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from qlnas.train.distributed import DistInfo, all_reduce_sum


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0
    """The epoch in progress (completed epochs before it)."""
    batch: int = 0
    """Batches of `epoch` already trained (a mid-epoch checkpoint resumes after them)."""
    step: int = 0
    """Optimizer steps taken in total."""
    lr_scale: float = 1.0
    """Product of the NaN-rollback LR factors so far."""
    rollbacks: int = 0
    nan_events: int = 0
    best_top1: float = -1.0
    """Best validation top-1 so far of the weights the run exports (see `export`)."""
    world_size: int = 1
    history: list = field(default_factory=list)
    epoch_loss_sum: float = 0.0
    """Sum over all ranks of loss x batch of `epoch`'s batches so far (a mid-epoch resume
    keeps the epoch's mean train loss exact)."""
    epoch_seen: int = 0
    """Samples over all ranks behind `epoch_loss_sum`."""
    overflows: int = 0
    """fp16 steps the GradScaler skipped (gradients overflowed), in total."""
    overflow_streak: int = 0
    """Consecutive skipped steps up to now (divergence past `max_overflow_steps`)."""
    skipped_samples: list = field(default_factory=list)
    """[split, index in the file] of the samples left out so far (`skip_corrupt`)."""
    data_mode: str = "cached"
    """How the train file is read (qlnas.data.order); a resume under `auto` keeps it."""


@dataclass
class Parts:
    """The live objects of a run."""

    model: nn.Module
    """The bare model (checkpoints save this)."""
    train_model: nn.Module
    """What the forward pass runs: compiled and/or DDP-wrapped `model`."""
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    ema: object | None
    mixup: object | None
    criterion: nn.Module
    val_criterion: nn.Module
    autocast_dtype: torch.dtype | None
    grad_clip: float
    dist: DistInfo
    max_overflow_steps: int = 20
    """fp16: this many consecutive overflow steps count as divergence."""
    on_step: object = None
    """Called after every optimizer step with the Progress (mid-epoch checkpoints)."""
    should_stop: object = None
    """Polled on rank 0 (at most every `poll_seconds`): True ends the run as pruned."""
    poll_seconds: float = 2.0
    progress_bar: bool = True
    """A tqdm bar per epoch on the primary process (off in Ray workers: their output is logs)."""


def set_lr(parts: Parts, progress: Progress) -> float:
    """The per-iteration schedule (timm), scaled by the rollback factor."""
    parts.scheduler.step_update(progress.step)
    for group in parts.optimizer.param_groups:
        group["lr"] *= progress.lr_scale
    return parts.optimizer.param_groups[0]["lr"]


def _autocast(parts: Parts):
    if parts.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(parts.dist.device.type, dtype=parts.autocast_dtype)


# Per-step all-reduced counters: [non-finite loss, non-finite grads, stop asked, loss x n, n].
_NONFINITE_LOSS, _NONFINITE_GRAD, _STOP, _LOSS, _COUNT = range(5)


def mix(mixup, images: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's Mixup/CutMix, which pairs a batch with its reverse and so needs an even batch;
    an odd one (--skip-corrupt left a damaged sample out) keeps its last sample unmixed."""
    if len(images) % 2 == 0:
        return mixup(images, target)
    from timm.data.mixup import mixup_target

    last = mixup_target(target[-1:], mixup.num_classes, 1.0, mixup.label_smoothing)
    if len(images) == 1:
        return images, last
    head, head_target = mixup(images[:-1], target[:-1])
    return torch.cat([head, images[-1:]]), torch.cat([head_target, last])


def train_one_epoch(parts: Parts, loader, progress: Progress, max_steps: int = 0,
                    tb=None) -> dict:
    """Train one epoch from `progress.batch`; stops at once on divergence.

    Every step all ranks agree, through one all-reduce, on the global mean loss and on what
    happened: a non-finite loss (or non-finite gradients without a GradScaler) is divergence,
    ``nonfinite`` in the result, and no update is applied; with fp16's GradScaler a step whose
    gradients overflowed is skipped by the scaler (which backs off its scale) and counted,
    and only `max_overflow_steps` in a row are divergence. ``stopped`` is True when
    `should_stop` asked to end the run.
    """
    parts.train_model.train()
    dist = parts.dist
    start_batch = progress.batch
    if start_batch == 0:
        progress.epoch_loss_sum, progress.epoch_seen = 0.0, 0
    total = len(loader) if not max_steps else min(len(loader), max_steps)
    bar = tqdm(total=total, initial=start_batch, desc=f"epoch {progress.epoch}",
               disable=not (dist.is_primary and parts.progress_bar), leave=False,
               dynamic_ncols=True)
    scaling = parts.scaler.is_enabled()
    seen = 0
    grad_norm = torch.zeros(())
    lr = parts.optimizer.param_groups[0]["lr"]
    nonfinite = stopped = False
    t0 = last_poll = time.perf_counter()
    for i, (images, target) in enumerate(loader):
        if i < start_batch:
            continue
        if max_steps and i >= max_steps:
            break
        lr = set_lr(parts, progress)
        if parts.mixup is not None:
            images, target = mix(parts.mixup, images, target)
        with _autocast(parts):
            loss = parts.criterion(parts.train_model(images), target)
        parts.optimizer.zero_grad(set_to_none=True)
        parts.scaler.scale(loss).backward()
        parts.scaler.unscale_(parts.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            parts.model.parameters(), parts.grad_clip or math.inf)
        counts = torch.zeros(5, dtype=torch.float64)
        loss_value = loss.detach().double().cpu()
        counts[_NONFINITE_LOSS] = float(not torch.isfinite(loss_value))
        counts[_NONFINITE_GRAD] = float(not torch.isfinite(grad_norm))
        counts[_LOSS] = loss_value * images.shape[0]
        counts[_COUNT] = images.shape[0]
        if parts.should_stop is not None and dist.is_primary \
                and time.perf_counter() - last_poll >= parts.poll_seconds:
            last_poll = time.perf_counter()
            counts[_STOP] = float(bool(parts.should_stop()))
        counts = all_reduce_sum(counts, dist).cpu()
        if counts[_STOP] > 0:
            stopped = True
            parts.optimizer.zero_grad(set_to_none=True)
            break
        overflow = scaling and counts[_NONFINITE_GRAD] > 0 and counts[_NONFINITE_LOSS] == 0
        if counts[_NONFINITE_LOSS] > 0 or (counts[_NONFINITE_GRAD] > 0 and not overflow) \
                or (overflow and progress.overflow_streak + 1 >= parts.max_overflow_steps):
            nonfinite = True
            parts.optimizer.zero_grad(set_to_none=True)
            break
        parts.scaler.step(parts.optimizer)  # skipped by the scaler on an overflow
        parts.scaler.update()
        if overflow:
            progress.overflows += 1
            progress.overflow_streak += 1
        else:
            progress.overflow_streak = 0
            if parts.ema is not None:
                parts.ema.update(parts.model, step=progress.step)
        progress.step += 1
        progress.batch = i + 1
        step_loss = float(counts[_LOSS] / counts[_COUNT])
        progress.epoch_loss_sum += float(counts[_LOSS])
        progress.epoch_seen += int(counts[_COUNT])
        seen += int(counts[_COUNT])
        if tb is not None:
            values = {"train/loss": step_loss, "train/lr": lr,
                      "train/grad_norm": float(grad_norm)}
            if scaling:
                values.update({"train/overflow": progress.overflows,
                               "train/loss_scale": parts.scaler.get_scale()})
            tb.scalars(values, progress.step)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.3g}")
        if parts.on_step is not None:
            parts.on_step(progress)
    bar.close()
    elapsed = time.perf_counter() - t0
    return {
        "train_loss": progress.epoch_loss_sum / progress.epoch_seen
        if progress.epoch_seen else math.nan,
        "lr": lr,
        "img_per_sec": seen / elapsed if elapsed > 0 else 0.0,
        "grad_norm": float(grad_norm),
        "overflows": progress.overflows,
        "nonfinite": nonfinite,
        "stopped": stopped,
    }


@torch.no_grad()
def evaluate(model: nn.Module, loader, parts: Parts) -> dict:
    """Top-1, top-5 and loss over the whole validation set (summed over ranks)."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)  # loss sum, top1, top5, count
    for images, target in loader:
        with _autocast(parts):
            logits = model(images)
        loss = parts.val_criterion(logits.float(), target)
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(target[:, None])
        totals += torch.tensor([loss.item() * target.shape[0], hits[:, 0].sum().item(),
                                hits.any(1).sum().item(), target.shape[0]], dtype=torch.float64)
    totals = all_reduce_sum(totals, parts.dist).cpu()
    n = max(totals[3].item(), 1.0)
    return {"val_loss": totals[0].item() / n, "val_top1": totals[1].item() / n,
            "val_top5": totals[2].item() / n}
