"""The per-iteration learning-rate schedule: timm's cosine or step scheduler over the run's
steps, warm-up included in `epochs`.

The schedule is a function of the config, the steps per epoch and the step counter alone, so
a resumed run rebuilds it from its (possibly longer) config instead of restoring it: resuming
with another `epochs` continues over the new length from the current step.
"""

from __future__ import annotations

import math

import torch
from timm.scheduler import CosineLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler

from qlnas.errors import UserError


def total_steps(epochs: int, steps_per_epoch: int) -> int:
    return epochs * steps_per_epoch


def warmup_steps(warmup_epochs: float, steps_per_epoch: int) -> int:
    return round(warmup_epochs * steps_per_epoch)


def build_scheduler(optimizer: torch.optim.Optimizer, config, steps_per_epoch: int) -> Scheduler:
    """The schedule of `config` (a TrainConfig) stepped once per optimizer update.

    Cosine: linear warm-up from `warmup_lr` to `lr` over `warmup_epochs`, then a half cosine
    that reaches `min_lr` exactly at the run's last step. Step: the same warm-up, then `lr`
    times `step_gamma` every `step_epochs` epochs counted from the start of the run.
    """
    total = total_steps(config.epochs, steps_per_epoch)
    warmup = warmup_steps(config.warmup_epochs, steps_per_epoch)
    if warmup and warmup >= total - 1:
        raise UserError(
            f"warmup_epochs={config.warmup_epochs} is not shorter than epochs={config.epochs} "
            f"({warmup} of {total} steps): the LR would never anneal; pass a smaller "
            "--warmup-epochs or more --epochs")
    if config.schedule == "cosine":
        # timm's cosine reaches lr_min at t_initial after the warm-up prefix; the last update
        # of the run is step total - 1.
        anneal = max(1, total - 1 - warmup)
        return CosineLRScheduler(optimizer, t_initial=anneal, lr_min=config.min_lr,
                                 warmup_t=warmup, warmup_lr_init=config.warmup_lr,
                                 warmup_prefix=True, t_in_epochs=False)
    decay = max(1, round(config.step_epochs * steps_per_epoch))
    return StepLRScheduler(optimizer, decay_t=decay, decay_rate=config.step_gamma,
                           warmup_t=warmup, warmup_lr_init=config.warmup_lr,
                           warmup_prefix=False, t_in_epochs=False)


def lr_curve(config, steps_per_epoch: int) -> list[float]:
    """The peak-group LR at every step of the run (what `train/lr` will show)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=config.lr)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    lrs = []
    for step in range(total_steps(config.epochs, steps_per_epoch)):
        scheduler.step_update(step)
        lrs.append(optimizer.param_groups[0]["lr"])
    if not all(math.isfinite(v) for v in lrs):
        raise UserError("the learning-rate schedule is not finite; check lr, min_lr, warmup_lr")
    return lrs


def train_resolution(config, epoch: int) -> int:
    """The train resolution of `epoch` (progressive resizing when `min_resolution` and
    `ramp_epochs` are set, else `resolution`)."""
    if not (config.min_resolution and config.ramp_epochs):
        return config.resolution
    from qlnas.data import resolution_for_epoch

    return resolution_for_epoch(epoch, min_res=config.min_resolution, max_res=config.resolution,
                                end_ramp=config.ramp_epochs)
