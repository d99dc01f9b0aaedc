"""One training epoch and one evaluation, each returning a dict of metrics."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from qlnas.train.distributed import DistInfo, all_reduce_max, all_reduce_sum


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
    world_size: int = 1
    history: list = field(default_factory=list)


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


def train_one_epoch(parts: Parts, loader, progress: Progress, max_steps: int = 0,
                    tb=None) -> dict:
    """Train one epoch from `progress.batch`; stops at once on a non-finite loss or gradient.

    Returns the epoch's metrics; ``nonfinite`` is True when all ranks agreed (one all-reduced
    flag per step) that this step's loss or gradients were not finite. No update is applied
    then. ``stopped`` is True when `should_stop` asked to end the run (same all-reduce).
    """
    parts.train_model.train()
    dist = parts.dist
    start_batch = progress.batch
    total = len(loader) if not max_steps else min(len(loader), max_steps)
    bar = tqdm(total=total, initial=start_batch, desc=f"epoch {progress.epoch}",
               disable=not (dist.is_primary and parts.progress_bar), leave=False,
               dynamic_ncols=True)
    loss_sum = torch.zeros((), dtype=torch.float64)
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
            images, target = parts.mixup(images, target)
        with _autocast(parts):
            loss = parts.criterion(parts.train_model(images), target)
        parts.optimizer.zero_grad(set_to_none=True)
        parts.scaler.scale(loss).backward()
        parts.scaler.unscale_(parts.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            parts.model.parameters(), parts.grad_clip or math.inf)
        flag = 0.0 if (torch.isfinite(loss.detach()) and torch.isfinite(grad_norm)) else 1.0
        if parts.should_stop is not None and dist.is_primary \
                and time.perf_counter() - last_poll >= parts.poll_seconds:
            last_poll = time.perf_counter()
            flag = max(flag, 2.0 if parts.should_stop() else 0.0)
        flag = all_reduce_max(flag, dist)
        if flag > 0:
            nonfinite, stopped = flag == 1.0, flag == 2.0
            parts.optimizer.zero_grad(set_to_none=True)
            break
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        if parts.ema is not None:
            parts.ema.update(parts.model, step=progress.step)
        progress.step += 1
        progress.batch = i + 1
        loss_sum += loss.detach().double().cpu() * images.shape[0]
        seen += images.shape[0]
        if tb is not None:
            tb.scalars({"train/loss": loss.item(), "train/lr": lr,
                        "train/grad_norm": grad_norm.item()}, progress.step)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}")
        if parts.on_step is not None:
            parts.on_step(progress)
    bar.close()
    elapsed = time.perf_counter() - t0
    sums = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(seen), dtype=torch.float64)]),
                          dist).cpu()
    return {
        "train_loss": float(sums[0] / sums[1]) if sums[1] > 0 else math.nan,
        "lr": lr,
        "img_per_sec": float(sums[1]) / elapsed if elapsed > 0 else 0.0,
        "grad_norm": float(grad_norm),
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
