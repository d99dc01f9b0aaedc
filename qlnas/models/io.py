"""Model files: load any checkpoint or exported model that qlnas writes, or a plain one.

Accepted forms (all torch.save'd dicts):
- plain / exported: ``{"model_name", "num_classes", "state_dict"[, "spec"]}``;
- training checkpoint: ``{"model_name", "spec", "model": state_dict, ...}``.
A ``spec`` dict, when present, rebuilds the exact architecture (overrides included).
"""

from __future__ import annotations

import os
from pathlib import Path

import timm
import torch
from torch import nn

from qlnas.errors import UserError
from qlnas.fileio import atomic_torch_save
from qlnas.models.net import QLNet
from qlnas.models.spec import ArchSpec


def model_from_meta(model_name: str, num_classes: int | None = None,
                    spec: dict | None = None) -> nn.Module:
    """Build the architecture a file describes (not its weights)."""
    if spec is not None:
        return QLNet(ArchSpec.from_dict(spec))
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        return timm.create_model(model_name, **kwargs)
    except RuntimeError as exc:
        raise UserError(f"unknown model {model_name!r}: {exc}") from None


def load_model_file(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Load a model file into a model; returns (model, metadata without the weights)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such model file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input
        raise UserError(f"{path}: not a readable torch file ({exc.__class__.__name__})") from None
    if not isinstance(data, dict) or "model_name" not in data:
        raise UserError(f"{path}: expected a dict with 'model_name' and 'state_dict' (or 'model')")
    state = data.get("state_dict", data.get("model"))
    if state is None:
        raise UserError(f"{path}: holds no 'state_dict' (or 'model') entry")
    model = model_from_meta(data["model_name"], data.get("num_classes"), data.get("spec"))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"{path}: weights do not fit {data['model_name']}: {first}") from None
    meta = {k: v for k, v in data.items() if k not in ("state_dict", "model")}
    return model, meta


def save_model_file(path: str | os.PathLike, model: nn.Module, model_name: str,
                    **extra) -> None:
    """Write the plain form (atomically), loadable by `load_model_file` and timm."""
    payload = {"model_name": model_name, "num_classes": getattr(model, "num_classes", None),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    spec = getattr(model, "spec", None)
    if isinstance(spec, ArchSpec):
        payload["spec"] = spec.to_dict()
    payload.update(extra)
    atomic_torch_save(payload, path)
