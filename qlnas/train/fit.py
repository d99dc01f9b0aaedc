"""`fit(config)`: the one training function behind `qlnas train`, torchrun and Ray Train."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import timm
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch import nn

from qlnas.allocator import keep_freed_memory
from qlnas.errors import UserError
from qlnas.fileio import atomic_write_json
from qlnas.train.checkpoint import has_checkpoint, is_finite_state, seed_process
from qlnas.train.config import TrainConfig
from qlnas.train.distributed import (
    DistInfo,
    all_reduce_sum,
    broadcast_buffers,
    broadcast_object,
    gather_objects,
    setup_distributed,
    teardown_distributed,
)
from qlnas.train.engine import Parts, Progress, evaluate, train_one_epoch
from qlnas.train.logs import TBLogger, hparam_values, write_metrics_csv, write_run_info
from qlnas.train.run import RunFiles, check_resume, restore
from qlnas.train.schedule import build_scheduler, train_resolution

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
    """The timm model the config names, with its spec overrides (for a model that is not a
    qlnet, `arch` holds its own keyword arguments: a family a search space imports)."""
    if not timm.is_model(config.model):
        raise UserError(f"model: unknown model {config.model!r} (see `qlnas models`)")
    try:
        return timm.create_model(config.model, num_classes=num_classes,
                                 drop_rate=config.drop_rate,
                                 drop_path_rate=config.drop_path_rate, **config.arch)
    except (ValueError, TypeError) as exc:
        raise UserError(f"arch: {exc}") from None


def validate(config: TrainConfig, world_size: int) -> tuple[Path, Path, int, nn.Module]:
    """Everything that can be checked before a process group exists; UserError otherwise.

    Returns the data files, the class count and the model (built from the current RNG state).
    """
    from qlnas.data import same_classes
    from qlnas.data.integrity import open_beton

    if config.sync_bn and not torch.cuda.is_available():
        raise UserError("sync_bn=True needs CUDA (torch's SyncBatchNorm runs on GPUs); on CPU "
                        "the BN statistics of rank 0 are broadcast before every evaluation")
    if config.batch_size % world_size:
        raise UserError(f"batch_size={config.batch_size} is not divisible by the "
                        f"{world_size} processes")
    if (config.mixup or config.cutmix) and config.batch_size // world_size % 2:
        raise UserError(f"batch_size={config.batch_size} over {world_size} process(es) is "
                        f"{config.batch_size // world_size} a process; mixup and cutmix pair "
                        "samples and need an even number")
    train, val = resolve_data(config)
    for path in (train, val):
        open_beton(path)  # a damaged file: one line, before any process starts
    num_classes = len(same_classes(train, val))
    model = build_model(config, num_classes)
    if config.init_from is not None:
        init_weights(model, config.init_from)
    return train, val, num_classes, model


def init_weights(model: nn.Module, path: str) -> None:
    """`init_from`: the file's weights, the classifier fresh when its class count differs."""
    from qlnas.models.io import init_from_file

    try:
        head = init_from_file(model, path)
    except UserError as exc:
        raise UserError(f"init_from: {exc}") from None
    log.info("weights from %s%s", path, "" if head else " (a fresh classifier: another "
             "class count)")


def _data_mode(config: TrainConfig, ckpt: dict | None) -> str:
    """How to read the data: `config.data_mode`; on resume under `auto`, the way the run
    started (a node with other memory would otherwise change the order mid-run)."""
    recorded = ckpt["state"].get("data_mode", "cached") if ckpt is not None else None
    if recorded is None or config.data_mode == recorded:
        return config.data_mode
    if config.data_mode == "auto":
        log.info("reading the data %s, as the run did before it was resumed", recorded)
        return recorded
    log.warning("data_mode=%s: the run read its data %s until now, so the batches from here "
                "on are not those of an uninterrupted run", config.data_mode, recorded)
    return config.data_mode


def build_loaders(config: TrainConfig, dist: DistInfo, train_path: Path, val_path: Path,
                  model: nn.Module | None = None, mode: str | None = None):
    """The train and val loaders of this process and the train steps per epoch (validation at
    `model`'s crop_pct, timm's default without one; `mode` overrides `config.data_mode`)."""
    from qlnas.data import build_train_loader, build_val_loader
    from qlnas.data.loaders import DEFAULT_CROP_PCT, val_crop_pct

    per_rank = config.batch_size // dist.world_size
    loader_kw = dict(device=dist.device, distributed=dist.distributed,
                     num_workers=config.workers, skip_corrupt=config.skip_corrupt,
                     mode=mode or config.data_mode)
    train_loader = build_train_loader(train_path, batch_size=per_rank,
                                      resolution=config.resolution, seed=config.seed,
                                      decoder=config.decoder,
                                      scale=(config.crop_scale_min, 1.0), flip=config.hflip,
                                      **loader_kw)
    crop_pct = val_crop_pct(model) if model is not None else DEFAULT_CROP_PCT
    val_loader = build_val_loader(val_path, batch_size=per_rank, resolution=config.resolution,
                                  crop_pct=crop_pct, **loader_kw)
    steps = len(train_loader) if not config.max_steps_per_epoch \
        else min(len(train_loader), config.max_steps_per_epoch)
    if steps == 0:
        raise UserError(f"train_data: {train_path} has fewer samples than one batch of "
                        f"{per_rank} per process")
    return train_loader, val_loader, steps


def make_parts(config: TrainConfig, model: nn.Module, dist: DistInfo, num_classes: int,
                steps_per_epoch: int) -> Parts:
    device = dist.device
    fmt = torch.channels_last if config.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=fmt)
    if config.sync_bn and dist.distributed:
        # Same parameters, so the optimizer below and the checkpoints see the same tensors.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    amp = config.amp if config.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]
    opt = {"sgd": "momentum", "nesterov": "nesterov", "adamw": "adamw", "lamb": "lamb"}
    opt_kwargs = {"momentum": config.momentum} if config.optimizer in ("sgd", "nesterov") else {}
    # filter_bias_and_bn: no weight decay on 1-D parameters (norm scales, biases), by shape.
    optimizer = create_optimizer_v2(model, opt=opt[config.optimizer], lr=config.lr,
                                    weight_decay=config.weight_decay, filter_bias_and_bn=True,
                                    **opt_kwargs)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
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
                 scaler=torch.amp.GradScaler(device.type, init_scale=config.fp16_init_scale,
                                             enabled=amp == "fp16"),
                 ema=ema, mixup=mixup, criterion=criterion, val_criterion=nn.CrossEntropyLoss(),
                 autocast_dtype=dtype, grad_clip=config.grad_clip, dist=dist,
                 max_overflow_steps=config.max_overflow_steps)


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
    if dist.device.type == "cpu":
        keep_freed_memory()  # a third faster element-wise ops (see qlnas.allocator)
    torch.manual_seed(config.seed)  # the model's initialisation, the same on every rank
    train_path, val_path, num_classes, model = validate(config, dist.world_size)
    run = RunFiles(config, dist, model)
    run.clean()
    has_last = broadcast_object(has_checkpoint(run.last), dist)  # one answer before any write
    ckpt = None
    if resume and has_last:
        ckpt, path = run.resume_point()
        check_resume(ckpt, config, dist.world_size, path)
    elif has_last:
        raise UserError(f"out: {run.out} already holds a run; pass --resume or another --out")
    mode = _data_mode(config, ckpt)
    train_loader, val_loader, steps = build_loaders(config, dist, train_path, val_path, model,
                                                    mode)
    parts = make_parts(config, model, dist, num_classes, steps)
    parts.should_stop = should_stop
    parts.progress_bar = progress_bar
    seed_process(config.seed, dist.rank)  # mixup, cutmix, drop path: a stream per rank
    progress = Progress(world_size=dist.world_size)
    if ckpt is not None:
        progress = restore(parts, ckpt, dist.rank)
        log.info("resumed from %s at epoch %d, batch %d", path, progress.epoch, progress.batch)
    progress.data_mode = train_loader.mode
    tb = None
    if dist.is_primary:
        run.out.mkdir(parents=True, exist_ok=True)
        write_run_info(run.out, config.to_dict(), {"world_size": dist.world_size,
                                                   "device": str(dist.device),
                                                   "num_classes": num_classes})
        # A resumed run drops what the killed one logged past its checkpoint and continues
        # the same HParams session.
        tb = TBLogger(run.out / "tb", hparam_values(run.export_name, run.spec, config.to_dict()),
                      purge_step=progress.step + 1 if has_last else None)
    if not has_last:
        run.save(parts, progress)  # the first good state, for rollback and resume
    if config.checkpoint_steps:
        def on_step(p: Progress) -> None:
            # Not at an epoch's last step: the epoch-end save follows, and two generations of
            # one step would leave a NaN on the next step nothing to roll back to.
            if p.step % config.checkpoint_steps == 0 and p.batch < steps:
                run.save(parts, p)
        parts.on_step = on_step
    status = "completed"
    try:
        status, progress = _loop(config, parts, run, progress, train_loader, val_loader, tb,
                                 report)
    finally:
        if tb is not None:
            tb.close()
    weights = _export_weights(config, progress.history[-1] if progress.history else {})
    if status == "completed":
        run.export(parts, weights)
    result = dict(progress.history[-1]) if progress.history else {}
    result.update(status=status, epochs_run=progress.epoch, steps=progress.step,
                  nan_events=progress.nan_events, rollbacks=progress.rollbacks,
                  overflows=progress.overflows, best_top1=max(progress.best_top1, 0.0),
                  skipped_samples=len(progress.skipped_samples), data_mode=progress.data_mode,
                  exported=weights if status == "completed" else None, out=str(run.out))
    if dist.is_primary:
        atomic_write_json(result, run.out / "result.json")
    return result


def _export_weights(config: TrainConfig, row: dict) -> str:
    """model or ema: what `export` asks for, `best` being whichever validated better."""
    if config.export != "best":
        return config.export
    if "val_top1_ema" in row and row["val_top1_ema"] > row.get("val_top1", -1.0):
        return "ema"
    return "model"


def _validate_epoch(parts: Parts, val_loader) -> dict:
    """Val metrics of the model (its BN statistics already rank 0's) and of its EMA."""
    val = evaluate(parts.model, val_loader, parts)
    if parts.ema is not None:
        broadcast_buffers(parts.ema.module, parts.dist)
        val.update({f"{k}_ema": v for k, v in evaluate(parts.ema.module, val_loader,
                                                       parts).items()})
    return val


def _log_epoch(tb, row: dict, step: int) -> None:
    values = {"val/top1": row["val_top1"], "val/top5": row["val_top5"],
              "val/loss": row["val_loss"], "train/img_per_sec": row["img_per_sec"],
              "train/epoch_loss": row["train_loss"], "events/nan": row["nan_events"]}
    if "skipped_samples" in row:
        values["data/skipped_samples"] = row["skipped_samples"]
    if "val_top1_ema" in row:
        values.update({"val_ema/top1": row["val_top1_ema"], "val_ema/top5": row["val_top5_ema"],
                       "val_ema/loss": row["val_loss_ema"]})
    tb.scalars(values, step)
    tb.flush()


def _loop(config, parts, run, progress, train_loader, val_loader, tb, report
          ) -> tuple[str, Progress]:
    dist = parts.dist
    while progress.epoch < config.epochs:
        epoch = progress.epoch
        train_loader.set_resolution(train_resolution(config, epoch))  # a no-op when unchanged
        train_loader.set_epoch(epoch)
        t0 = time.perf_counter()
        metrics = train_one_epoch(parts, train_loader, progress, config.max_steps_per_epoch, tb)
        if metrics.pop("stopped"):
            log.info("stop requested at step %d (epoch %d)", progress.step, epoch)
            return "pruned", progress
        nonfinite = metrics.pop("nonfinite")
        # Rank 0's BN statistics on every rank: what is checked, evaluated and saved is one
        # model.
        broadcast_buffers(parts.model, dist)
        if not nonfinite and not _state_is_finite(parts):
            # Finite losses and gradients can still push a weight or a BN statistic past
            # float range; evaluating or saving that state would hide the divergence.
            log.warning("weights or BN statistics not finite after step %d", progress.step)
            nonfinite = True
        if nonfinite:
            progress.nan_events += 1
            log.warning("non-finite loss or gradient at step %d (epoch %d)", progress.step + 1,
                        epoch)
            if tb is not None:
                tb.scalars({"events/nan": progress.nan_events}, progress.step + 1)
                tb.flush()
            if config.on_nan == "rollback" and progress.rollbacks < config.max_rollbacks:
                restored = _rollback(config, parts, run, progress)
                if restored is not None:
                    progress = restored
                    continue
            # Every metric an epoch reports, at its worst: a search's objective must be in
            # every result (Tune's strict check ends the whole search otherwise).
            event = {"epoch": epoch, "step": progress.step + 1, "diverged": True,
                     "train_loss": math.nan, "val_loss": math.nan, "val_top1": 0.0,
                     "val_top5": 0.0, "img_per_sec": 0.0, "nan_events": progress.nan_events}
            if report is not None:
                report(event)
            log.error("diverged at step %d; stopping", progress.step + 1)
            return "diverged", progress
        val = _validate_epoch(parts, val_loader)
        row = {"epoch": epoch + 1, "step": progress.step, **metrics, **val,
               "epoch_time": time.perf_counter() - t0, "nan_events": progress.nan_events,
               "lr_scale": progress.lr_scale}
        if config.skip_corrupt:
            progress.skipped_samples = _skipped(progress, train_loader, val_loader, dist)
            row["skipped_samples"] = len(progress.skipped_samples)
        progress.epoch, progress.batch = epoch + 1, 0
        progress.history.append(row)
        weights = _export_weights(config, row)
        score = row["val_top1_ema"] if weights == "ema" else row["val_top1"]
        improved = score > progress.best_top1
        progress.best_top1 = max(progress.best_top1, score)
        if tb is not None:
            _log_epoch(tb, row, progress.step)
        run.save(parts, progress)
        if improved:
            run.save(parts, progress, "best.pt", keep_previous=False,
                     extra={"export_weights": weights, "val_top1": score})
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


def _skipped(progress: Progress, train_loader, val_loader, dist: DistInfo) -> list:
    """[split, index] of every sample left out so far, over all ranks and epochs (the same on
    every rank)."""
    mine = {tuple(s) for s in progress.skipped_samples}
    mine |= {("train", i) for i in train_loader.skipped} | {("val", i) for i in val_loader.skipped}
    every = gather_objects(mine, dist)
    union = sorted(set().union(*every)) if every is not None else None
    return [list(s) for s in broadcast_object(union, dist)]


def _state_is_finite(parts: Parts) -> bool:
    """Every rank's verdict on its weights and optimizer state."""
    bad = 0.0 if is_finite_state(parts.model, parts.optimizer) else 1.0
    return all_reduce_sum(torch.tensor([bad], dtype=torch.float64), parts.dist).item() == 0


def _stop_requested(should_stop, dist: DistInfo) -> bool:
    """Rank 0 asks; every rank gets the same answer."""
    return bool(broadcast_object(bool(should_stop()) if dist.is_primary else None, dist))


def _rollback(config: TrainConfig, parts: Parts, run: RunFiles, progress: Progress
              ) -> Progress | None:
    """Reload the newest checkpoint that cannot reproduce the failure, with a smaller LR;
    None when there is none."""
    point = run.rollback_point(progress)
    if point is None:
        log.error("no checkpoint before step %d to roll back to", progress.step)
        return None
    ckpt, path = point
    restored = restore(parts, ckpt, parts.dist.rank)
    restored.rollbacks = progress.rollbacks + 1
    restored.nan_events = progress.nan_events
    restored.overflows = progress.overflows
    restored.lr_scale = progress.lr_scale * config.nan_lr_factor
    log.warning("rollback %d/%d to %s (epoch %d batch %d), LR x%.3g", restored.rollbacks,
                config.max_rollbacks, path.name, restored.epoch, restored.batch,
                restored.lr_scale)
    # So a resume keeps the lowered LR; the other generation stays as it is (no rotation:
    # it may be the very state that failed).
    run.save(parts, restored, keep_previous=False)
    return restored
