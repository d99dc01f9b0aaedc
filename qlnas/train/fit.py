"""`fit(config)`: the one training function behind `qlnas train`, torchrun and Ray Train."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import timm
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn

from qlnas.allocator import keep_freed_memory
from qlnas.errors import UserError
from qlnas.fileio import atomic_write_json
from qlnas.models.io import save_model_file
from qlnas.models.spec import spec_to_name
from qlnas.train import checkpoint as ckpt_io
from qlnas.train.config import TrainConfig
from qlnas.train.distributed import (
    DistInfo,
    broadcast_object,
    setup_distributed,
    teardown_distributed,
)
from qlnas.train.engine import Parts, Progress, evaluate, train_one_epoch
from qlnas.train.logs import TBLogger, hparam_values, write_metrics_csv, write_run_info

log = logging.getLogger(__name__)

# Status of a run, also its exit code in the CLI.
EXIT_CODES = {"completed": 0, "diverged": 3, "pruned": 4}


def resolve_data(config: TrainConfig) -> tuple[Path, Path]:
    """The train and val files (the embedded dataset when none is given); must exist."""
    from qlnas.data import demo_dataset

    if config.train_data is None or config.val_data is None:
        demo_train, demo_val = demo_dataset()
    train = Path(config.train_data) if config.train_data else demo_train
    val = Path(config.val_data) if config.val_data else demo_val
    for name, path in (("train_data", train), ("val_data", val)):
        if not path.is_file():
            raise UserError(f"{name}: {path}: no such data file")
    return train, val


def build_model(config: TrainConfig, num_classes: int) -> nn.Module:
    """The timm model the config names, with its spec overrides."""
    if not timm.is_model(config.model):
        raise UserError(f"model: unknown model {config.model!r} (see `qlnas models`)")
    if config.arch and not config.model.startswith("qlnet"):
        raise UserError(f"arch: overrides apply to qlnet* models only, not {config.model!r}")
    try:
        return timm.create_model(config.model, num_classes=num_classes, **config.arch)
    except (ValueError, TypeError) as exc:
        raise UserError(f"arch: {exc}") from None


def validate(config: TrainConfig, world_size: int) -> tuple[Path, Path, int, nn.Module]:
    """Everything that can be checked before a process group exists; UserError otherwise.

    Returns the data files, the class count and the model (built from the current RNG state).
    """
    from qlnas.data import read_classes

    if config.batch_size % world_size:
        raise UserError(f"batch_size={config.batch_size} is not divisible by the "
                        f"{world_size} processes")
    train, val = resolve_data(config)
    num_classes = len(read_classes(train))
    return train, val, num_classes, build_model(config, num_classes)


def _make_parts(config: TrainConfig, model: nn.Module, dist: DistInfo, num_classes: int,
                steps_per_epoch: int) -> Parts:
    device = dist.device
    fmt = torch.channels_last if config.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=fmt)
    amp = config.amp if config.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]
    if dtype is not None and device.type == "cpu" and amp == "fp16":
        raise UserError("amp=fp16 needs CUDA; use bf16 or none on CPU")
    opt = {"sgd": "momentum", "nesterov": "nesterov", "adamw": "adamw", "lamb": "lamb"}
    opt_kwargs = {"momentum": config.momentum} if config.optimizer in ("sgd", "nesterov") else {}
    # filter_bias_and_bn: no weight decay on 1-D parameters (norm scales, biases), by shape.
    optimizer = create_optimizer_v2(model, opt=opt[config.optimizer], lr=config.lr,
                                    weight_decay=config.weight_decay, filter_bias_and_bn=True,
                                    **opt_kwargs)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched="cosine" if config.schedule == "cosine" else "step",
        num_epochs=config.epochs, decay_epochs=config.step_epochs,
        decay_rate=config.step_gamma, min_lr=config.min_lr, warmup_lr=config.warmup_lr,
        warmup_epochs=config.warmup_epochs, warmup_prefix=True, step_on_epochs=False,
        updates_per_epoch=steps_per_epoch)
    ema = ModelEmaV3(model, decay=config.ema_decay) if config.ema_decay > 0 else None
    mixup = None
    if config.mixup > 0 or config.cutmix > 0:
        mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
                      label_smoothing=config.label_smoothing, num_classes=num_classes)
        criterion: nn.Module = SoftTargetCrossEntropy()
    else:
        criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    train_model = torch.compile(model) if config.compile else model
    if dist.distributed:
        ids = [device.index] if device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(train_model, device_ids=ids)
    return Parts(model=model, train_model=train_model, optimizer=optimizer, scheduler=scheduler,
                 scaler=torch.amp.GradScaler(device.type, enabled=amp == "fp16"), ema=ema,
                 mixup=mixup, criterion=criterion, val_criterion=nn.CrossEntropyLoss(),
                 autocast_dtype=dtype, grad_clip=config.grad_clip, dist=dist)


def _restore(parts: Parts, ckpt: dict) -> Progress:
    parts.model.load_state_dict(ckpt["model"])
    parts.optimizer.load_state_dict(ckpt["optimizer"])
    parts.scheduler.load_state_dict(ckpt["scheduler"])
    parts.scaler.load_state_dict(ckpt["scaler"])
    if parts.ema is not None and ckpt.get("ema") is not None:
        parts.ema.module.load_state_dict(ckpt["ema"])
    ckpt_io.set_rng_state(ckpt["rng"])
    return Progress(**ckpt["state"])


class _Run:
    """Paths and writers of one run; only the primary process writes."""

    def __init__(self, config: TrainConfig, dist: DistInfo, model: nn.Module) -> None:
        self.config, self.dist = config, dist
        self.out = Path(config.out)
        self.ckpt_dir = self.out / "checkpoints"
        spec = getattr(model, "spec", None)
        self.spec = spec.to_dict() if spec is not None else None
        try:
            self.export_name = spec_to_name(spec) if spec is not None else config.model
        except ValueError:
            self.export_name = config.model

    def save(self, parts: Parts, progress: Progress, name: str = "last.pt") -> None:
        if self.dist.is_primary:
            ckpt_io.save_checkpoint(
                self.ckpt_dir / name, model=parts.model, model_name=self.export_name,
                spec=self.spec, optimizer=parts.optimizer, scheduler=parts.scheduler,
                scaler=parts.scaler, ema=parts.ema, state=dataclasses.asdict(progress),
                config=self.config.to_dict())
        if self.dist.distributed:
            torch.distributed.barrier()

    def export(self, parts: Parts) -> None:
        if not self.dist.is_primary:
            return
        save_model_file(self.out / "model.pt", parts.model, self.export_name)
        atomic_write_json({"model_name": self.export_name, "spec": self.spec},
                          self.out / "model_spec.json")


def fit(config: TrainConfig, dist: DistInfo | None = None, report=None,
        resume: bool = False, should_stop=None, progress_bar: bool = True) -> dict:
    """Train `config` to the end (or divergence); returns the final metrics and status.

    `dist`: the process's place in the job (default: from torchrun's environment, or an
    existing process group such as Ray Train's). `report(metrics)`: called on every rank after
    each epoch (and once at divergence) with identical metrics; the Ray Train worker passes
    ``ray.train.report`` here. `resume`: continue from ``out/checkpoints/last.pt`` if present.
    `should_stop()`: polled on rank 0 during training; True ends the run as ``pruned`` (the
    search's pruner asks this way, so a pruned trial ends from inside and frees its workers).
    """
    own_dist = dist is None
    dist = dist or setup_distributed()
    try:
        return _fit(config, dist, report, resume, should_stop, progress_bar)
    finally:
        if own_dist:
            teardown_distributed(dist)


def _fit(config: TrainConfig, dist: DistInfo, report, resume: bool, should_stop,
         progress_bar: bool) -> dict:
    from qlnas.data import build_train_loader, build_val_loader

    if dist.device.type == "cpu":
        keep_freed_memory()  # a third faster element-wise ops (see qlnas.allocator)
    torch.manual_seed(config.seed)  # the model's initialisation
    train_path, val_path, num_classes, model = validate(config, dist.world_size)
    per_rank = config.batch_size // dist.world_size
    loader_kw = dict(device=dist.device, distributed=dist.distributed,
                     num_workers=config.workers)
    train_loader = build_train_loader(train_path, batch_size=per_rank,
                                      resolution=config.resolution, seed=config.seed,
                                      decoder=config.decoder,
                                      scale=(config.crop_scale_min, 1.0), flip=config.hflip,
                                      **loader_kw)
    val_loader = build_val_loader(val_path, batch_size=per_rank, resolution=config.resolution,
                                  **loader_kw)
    steps = len(train_loader) if not config.max_steps_per_epoch \
        else min(len(train_loader), config.max_steps_per_epoch)
    if steps == 0:
        raise UserError(f"train_data: {train_path} has fewer samples than one batch of "
                        f"{per_rank} per process")
    parts = _make_parts(config, model, dist, num_classes, steps)
    parts.should_stop = should_stop
    parts.progress_bar = progress_bar
    run = _Run(config, dist, model)
    progress = Progress(world_size=dist.world_size)
    last = run.ckpt_dir / "last.pt"
    has_last = broadcast_object(last.is_file(), dist)  # one answer before anyone writes
    if resume and has_last:
        ckpt = ckpt_io.load_checkpoint(last)
        ckpt_io.check_compatible(ckpt, config.to_dict(), dist.world_size, last)
        progress = _restore(parts, ckpt)
        log.info("resumed from %s at epoch %d, batch %d", last, progress.epoch, progress.batch)
    elif has_last:
        raise UserError(f"out: {run.out} already holds a run; pass --resume or another --out")
    tb = None
    if dist.is_primary:
        run.out.mkdir(parents=True, exist_ok=True)
        write_run_info(run.out, config.to_dict(), {"world_size": dist.world_size,
                                                   "device": str(dist.device),
                                                   "num_classes": num_classes})
        tb = TBLogger(run.out / "tb", hparam_values(run.export_name, run.spec, config.to_dict()))
    if not has_last:
        run.save(parts, progress)  # the first good state, for rollback and resume
    if config.checkpoint_steps:
        def on_step(p: Progress) -> None:
            if p.step % config.checkpoint_steps == 0:
                run.save(parts, p)
        parts.on_step = on_step
    status = "completed"
    try:
        status, progress = _loop(config, parts, run, progress, train_loader, val_loader, tb,
                                 report)
    finally:
        if tb is not None:
            tb.close()
    if status == "completed":
        run.export(parts)
    result = dict(progress.history[-1]) if progress.history else {}
    result.update(status=status, epochs_run=progress.epoch, steps=progress.step,
                  nan_events=progress.nan_events, rollbacks=progress.rollbacks,
                  best_top1=max(progress.best_top1, 0.0), out=str(run.out))
    if dist.is_primary:
        atomic_write_json(result, run.out / "result.json")
    return result


def _loop(config, parts, run, progress, train_loader, val_loader, tb, report
          ) -> tuple[str, Progress]:
    from qlnas.data import resolution_for_epoch

    dist = parts.dist
    while progress.epoch < config.epochs:
        epoch = progress.epoch
        if config.min_resolution and config.ramp_epochs:
            res = resolution_for_epoch(epoch, min_res=config.min_resolution,
                                       max_res=config.resolution, end_ramp=config.ramp_epochs)
            train_loader.set_resolution(res)
        train_loader.set_epoch(epoch)
        t0 = time.perf_counter()
        metrics = train_one_epoch(parts, train_loader, progress, config.max_steps_per_epoch, tb)
        if metrics.pop("stopped"):
            log.info("stop requested at step %d (epoch %d)", progress.step, epoch)
            return "pruned", progress
        if metrics.pop("nonfinite"):
            progress.nan_events += 1
            log.warning("non-finite loss or gradient at step %d (epoch %d)", progress.step + 1,
                        epoch)
            if tb is not None:
                tb.scalars({"events/nan": progress.nan_events}, progress.step + 1)
                tb.flush()
            if config.on_nan == "rollback" and progress.rollbacks < config.max_rollbacks:
                progress = _rollback(config, parts, run, progress)
                continue
            event = {"epoch": epoch, "step": progress.step + 1, "diverged": True,
                     "train_loss": math.nan, "val_top1": 0.0, "nan_events": progress.nan_events}
            if report is not None:
                report(event)
            log.error("diverged at step %d; stopping", progress.step + 1)
            return "diverged", progress
        val = evaluate(parts.model, val_loader, parts)
        if parts.ema is not None:
            val.update({f"{k}_ema": v for k, v in evaluate(parts.ema.module, val_loader,
                                                           parts).items()})
        row = {"epoch": epoch + 1, "step": progress.step, **metrics, **val,
               "epoch_time": time.perf_counter() - t0, "nan_events": progress.nan_events,
               "lr_scale": progress.lr_scale}
        progress.epoch, progress.batch = epoch + 1, 0
        progress.history.append(row)
        improved = val["val_top1"] > progress.best_top1
        progress.best_top1 = max(progress.best_top1, val["val_top1"])
        if tb is not None:
            tb.scalars({"val/top1": val["val_top1"], "val/top5": val["val_top5"],
                        "val/loss": val["val_loss"], "train/img_per_sec": row["img_per_sec"],
                        "events/nan": progress.nan_events}, progress.step)
            tb.flush()
        run.save(parts, progress)
        if improved:
            run.save(parts, progress, "best.pt")
        if dist.is_primary:
            write_metrics_csv(progress.history, run.out / "metrics.csv")
            log.info("epoch %d/%d  train loss %.4f  val top1 %.4f  top5 %.4f  lr %.4g  %.0f img/s",
                     epoch + 1, config.epochs, row["train_loss"], row["val_top1"],
                     row["val_top5"], row["lr"], row["img_per_sec"])
        if report is not None:
            report({**row, "diverged": False})
        if parts.should_stop is not None and _stop_requested(parts.should_stop, dist):
            return "pruned", progress
    return "completed", progress


def _stop_requested(should_stop, dist: DistInfo) -> bool:
    """Rank 0 asks; every rank gets the same answer."""
    return bool(broadcast_object(bool(should_stop()) if dist.is_primary else None, dist))


def _rollback(config: TrainConfig, parts: Parts, run: _Run, progress: Progress) -> Progress:
    """Reload the last good checkpoint with a smaller learning rate."""
    ckpt = ckpt_io.load_checkpoint(run.ckpt_dir / "last.pt")
    restored = _restore(parts, ckpt)
    restored.rollbacks = progress.rollbacks + 1
    restored.nan_events = progress.nan_events
    restored.lr_scale = progress.lr_scale * config.nan_lr_factor
    log.warning("rollback %d/%d to epoch %d batch %d, LR x%.3g", restored.rollbacks,
                config.max_rollbacks, restored.epoch, restored.batch, restored.lr_scale)
    run.save(parts, restored)  # so a resume keeps the lowered LR
    return restored

