"""Training checkpoints: the unwrapped model, optimizer, scheduler, scaler, EMA, position,
resolved config and RNG states, written to a temporary file and renamed."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qlnas.errors import UserError
from qlnas.fileio import atomic_torch_save


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


def save_checkpoint(path: Path, *, model: nn.Module, model_name: str, spec: dict | None,
                    optimizer, scheduler, scaler, ema, state: dict, config: dict) -> None:
    """Write a checkpoint atomically. `state` holds epoch, step, lr_scale, history, ..."""
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
        "rng": rng_state(),
    }
    atomic_torch_save(payload, path)


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a damaged file is reported, not raised
        raise UserError(f"{path}: cannot read checkpoint ({exc.__class__.__name__})") from None


# Config fields that may change on resume without changing what is being trained.
RESUMABLE_CHANGES = {"out", "workers", "checkpoint_steps", "epochs", "decoder"}


def check_compatible(ckpt: dict, config: dict, world_size: int, path: Path) -> None:
    """Refuse to resume a checkpoint written by a different model or a different job."""
    old = ckpt.get("config", {})
    for key in sorted(set(old) | set(config)):
        if key in RESUMABLE_CHANGES:
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
