"""The files of one training run: checkpoints (two generations of `last.pt`, `best.pt`), the
exported model, and how a run is restored from them (resume, NaN rollback)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch import nn

from qlnas.fileio import atomic_write_json, remove_stale_temporaries
from qlnas.models.io import save_model_file
from qlnas.models.spec import spec_to_name
from qlnas.train import checkpoint as ckpt_io
from qlnas.train.config import TrainConfig
from qlnas.train.distributed import DistInfo, gather_objects
from qlnas.train.engine import Parts, Progress

log = logging.getLogger(__name__)


def restore(parts: Parts, ckpt: dict, rank: int) -> Progress:
    """Load a checkpoint into the live objects (this rank's RNG states included)."""
    parts.model.load_state_dict(ckpt["model"])
    parts.optimizer.load_state_dict(ckpt["optimizer"])
    # The LR schedule is rebuilt from this run's config (a longer --epochs continues over the
    # new length from the current step), not restored.
    parts.scaler.load_state_dict(ckpt["scaler"])
    if parts.ema is not None and ckpt.get("ema") is not None:
        parts.ema.module.load_state_dict(ckpt["ema"])
    rng = ckpt["rng"]
    ckpt_io.set_rng_state(rng[rank] if isinstance(rng, list) else rng)
    known = {f.name for f in dataclasses.fields(Progress)}
    return Progress(**{k: v for k, v in ckpt["state"].items() if k in known})


class RunFiles:
    """Paths and writers of one run; only the primary process writes."""

    def __init__(self, config: TrainConfig, dist: DistInfo, model: nn.Module) -> None:
        self.config, self.dist = config, dist
        self.out = Path(config.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.last = self.ckpt_dir / "last.pt"
        spec = getattr(model, "spec", None)
        self.spec = spec.to_dict() if spec is not None else None
        try:
            self.export_name = spec_to_name(spec) if spec is not None else config.model
        except ValueError:
            self.export_name = config.model

    def clean(self) -> None:
        """Remove the temporary files a killed run left (primary only)."""
        if self.dist.is_primary:
            for folder in (self.out, self.ckpt_dir):
                for tmp in remove_stale_temporaries(folder):
                    log.warning("removed %s, left by a run that was killed while writing it",
                                tmp)

    def save(self, parts: Parts, progress: Progress, name: str = "last.pt",
             keep_previous: bool = True, extra: dict | None = None) -> bool:
        """Checkpoint the run (every rank calls this: each rank's RNG states are gathered).

        A state whose weights or optimizer state are not finite is not written: it would
        reproduce the failure a rollback or resume is for. Returns whether it was written.
        """
        rng = gather_objects(ckpt_io.rng_state(), self.dist)
        written = False
        if self.dist.is_primary:
            if ckpt_io.is_finite_state(parts.model, parts.optimizer):
                ckpt_io.save_checkpoint(
                    self.ckpt_dir / name, model=parts.model, model_name=self.export_name,
                    spec=self.spec, optimizer=parts.optimizer, scheduler=parts.scheduler,
                    scaler=parts.scaler, ema=parts.ema, state=dataclasses.asdict(progress),
                    config=self.config.to_dict(), rng=rng, keep_previous=keep_previous,
                    extra=extra)
                written = True
            else:
                log.warning("not writing %s at step %d: the weights are not finite", name,
                            progress.step)
        if self.dist.distributed:
            torch.distributed.barrier()
        return written

    def resume_point(self) -> tuple[dict, Path]:
        """The checkpoint to resume from: `last.pt`, or the previous generation."""
        return ckpt_io.load_latest(self.last)

    def rollback_point(self, progress: Progress) -> tuple[dict, Path] | None:
        """The newest checkpoint that does not reproduce the failure of step
        `progress.step + 1`, or None.

        A checkpoint taken at `progress.step` holds the very weights that failed on the
        next batch: restoring it with a lower LR fails the same way, so the generation
        before it is taken.
        """
        for ckpt, path in ckpt_io.generations(self.last):
            if ckpt["state"]["step"] < progress.step:
                return ckpt, path
        return None

    def export(self, parts: Parts, weights: str) -> None:
        """`OUT/model.pt` from the model or its EMA (`weights`), and `OUT/model_spec.json`."""
        if not self.dist.is_primary:
            return
        module = parts.ema.module if weights == "ema" else parts.model
        save_model_file(self.out / "model.pt", module, self.export_name)
        atomic_write_json({"model_name": self.export_name, "spec": self.spec,
                           "weights": weights}, self.out / "model_spec.json")


def check_resume(ckpt: dict, config: TrainConfig, world_size: int, path: Path) -> None:
    """A UserError unless `ckpt` was written by this job (see checkpoint.check_compatible)."""
    defaults = TrainConfig().to_dict()
    ckpt_io.check_compatible(ckpt, config.to_dict(), world_size, path, defaults=defaults)

