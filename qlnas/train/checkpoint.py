"""Training checkpoints: the unwrapped model, optimizer, scheduler, scaler, EMA, position,
resolved config and RNG states, written to a temporary file and renamed."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qlnas.errors import UserError
from qlnas.fileio import atomic_path, fsync_file

log = logging.getLogger(__name__)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP and torch.compile wrappers (no module./_orig_mod. prefixes)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def rng_state() -> dict:
    """This process's Python, numpy, torch (and CUDA) generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_process(seed: int, rank: int) -> None:
    """Seed Python, numpy and torch (all CUDA devices too) from (seed, rank): every rank draws
    its own mixup/cutmix boxes and drop-path masks, the same ones on every run."""
    py, nps, th = np.random.SeedSequence([seed, rank]).generate_state(3)
    random.seed(int(py))
    np.random.seed(int(nps))
    torch.manual_seed(int(th))


def is_finite_state(model: nn.Module, optimizer=None) -> bool:
    """Are all weights, buffers (and optimizer state) finite? A checkpoint that is not would
    reproduce the failure it is meant to recover from."""
    tensors = [t for t in unwrap(model).state_dict().values() if t.is_floating_point()]
    if optimizer is not None:
        for st in optimizer.state.values():
            tensors += [t for t in st.values() if torch.is_tensor(t) and t.is_floating_point()]
    if not tensors:
        return True
    # One flag per tensor, read back once (one device sync, not one per tensor).
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def previous_path(path: Path) -> Path:
    """Where the generation before `path` is kept (last.pt -> last.prev.pt)."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(path: Path, *, model: nn.Module, model_name: str, spec: dict | None,
                    optimizer, scheduler, scaler, ema, state: dict, config: dict,
                    rng: list | dict, keep_previous: bool = True, extra: dict | None = None
                    ) -> None:
    """Write a checkpoint atomically and durably. `state` holds epoch, step, lr_scale,
    history, ...; `rng` every rank's generator states (a list indexed by rank).

    With `keep_previous` the file it replaces becomes the previous generation
    (`previous_path`), the fallback when this one cannot be read.
    """
    payload = {
        "model_name": model_name,
        "num_classes": getattr(unwrap(model), "num_classes", None),
        "spec": spec,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "ema": ema.module.state_dict() if ema is not None else None,
        "state": state,
        "config": config,
        "rng": rng,
        **(extra or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
        fsync_file(tmp)
        if keep_previous and path.is_file():
            # Between these two renames only the previous generation exists; the loader
            # falls back to it.
            os.replace(path, previous_path(path))


def load_checkpoint(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a damaged file is reported, not raised
        raise UserError(f"{path}: cannot read checkpoint ({exc.__class__.__name__})") from None
    if not isinstance(ckpt, dict) or "state" not in ckpt or "model" not in ckpt:
        raise UserError(f"{path}: not a qlnas training checkpoint")
    return ckpt


def has_checkpoint(path: Path) -> bool:
    """Is there a run to resume at `path` (or its previous generation)?"""
    return path.is_file() or previous_path(path).is_file()


def load_latest(path: Path) -> tuple[dict, Path]:
    """The checkpoint at `path`, or its previous generation (with a warning) when `path` is
    missing, truncated or unreadable."""
    try:
        return load_checkpoint(path), path
    except UserError as exc:
        prev = previous_path(path)
        if not prev.is_file():
            raise
        log.warning("%s; falling back to the previous checkpoint %s", exc, prev)
        return load_checkpoint(prev), prev


def generations(path: Path) -> Iterator[tuple[dict, Path]]:
    """The readable generations at `path`, newest first, each read only when asked for."""
    for p in (path, previous_path(path)):
        try:
            yield load_checkpoint(p), p
        except UserError as exc:
            if p.exists():
                log.warning("%s", exc)


# Config fields that may change on resume without changing what is being trained.
# A longer or shorter `epochs` re-plans the LR schedule over the new length from the current
# step (see qlnas.train.schedule).
RESUMABLE_CHANGES = {"out", "workers", "checkpoint_steps", "epochs", "decoder", "export",
                     "skip_corrupt", "data_mode"}


def check_compatible(ckpt: dict, config: dict, world_size: int, path: Path,
                     defaults: dict | None = None) -> None:
    """Refuse to resume a checkpoint written by a different model or a different job.

    A key the checkpoint's config lacks (written before the field existed) is compatible when
    this run leaves it at its default (`defaults`).
    """
    old = ckpt.get("config", {})
    defaults = defaults or {}
    for key in sorted(set(old) | set(config)):
        if key in RESUMABLE_CHANGES:
            continue
        if key not in old and key in defaults and config.get(key) == defaults[key]:
            continue
        if old.get(key) != config.get(key):
            raise UserError(
                f"--resume: {path} was written with {key}={old.get(key)!r}, this run has "
                f"{key}={config.get(key)!r}; use another --out or the same settings"
            )
    old_world = ckpt.get("state", {}).get("world_size")
    if old_world is not None and old_world != world_size:
        raise UserError(
            f"--resume: {path} was written by {old_world} processes, this run has {world_size}; "
            "the data order and per-process batch would change"
        )
