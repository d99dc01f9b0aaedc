"""Model files: load any checkpoint or exported model that qlnas writes, or a plain one.

Accepted forms (all torch.save'd dicts):
- plain / exported: ``{"model_name", "num_classes", "state_dict"[, "spec"]}``;
- training checkpoint: ``{"model_name", "spec", "model": state_dict, ...}``.
A ``spec`` dict, when present, rebuilds the exact architecture (overrides included). The model
is built in the dtype of the file's weights, so a float64 file loads without rounding.
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


def read_model_file(path: str | os.PathLike) -> tuple[dict, dict]:
    """(state dict, metadata without the weights) of a model file, checked for its form."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such model file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input
        raise UserError(f"{path}: not a readable torch file ({exc.__class__.__name__})") from None
    if not isinstance(data, dict) or "model_name" not in data:
        hint = ""
        if isinstance(data, dict):
            from qlnas.models.convert import is_liu2023_layout

            if is_liu2023_layout(data):
                hint = " (this is the authors' layout: `qlnas convert` it first)"
        raise UserError(f"{path}: expected a dict with 'model_name' and 'state_dict' (or "
                        f"'model'){hint}")
    state = data.get("state_dict", data.get("model"))
    if state is None:
        raise UserError(f"{path}: holds no 'state_dict' (or 'model') entry")
    meta = {k: v for k, v in data.items() if k not in ("state_dict", "model")}
    return state, meta


def weights_dtype(state: dict) -> torch.dtype:
    """The dtype of a state dict's floating-point tensors (float32 when it has none)."""
    return next((v.dtype for v in state.values()
                 if isinstance(v, torch.Tensor) and v.is_floating_point()), torch.float32)


def load_model_file(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Load a model file into a model of its weights' dtype; returns (model, metadata without
    the weights)."""
    state, meta = read_model_file(path)
    model = model_from_meta(meta["model_name"], meta.get("num_classes"), meta.get("spec"))
    model.to(weights_dtype(state))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"{path}: weights do not fit {meta['model_name']}: {first}") from None
    return model, meta


def init_from_file(model: nn.Module, path: str | os.PathLike) -> bool:
    """Copy a model file's weights into `model` (weights only); the classifier stays fresh when
    its shape differs (another class count). Returns whether the classifier was copied too."""
    state, meta = read_model_file(path)
    own = model.state_dict()
    head = model.get_classifier(name_only=True) if hasattr(model, "get_classifier") else "fc"
    is_head = [k for k in own if k.startswith(f"{head}.")]
    head_fits = all(k in state and state[k].shape == own[k].shape for k in is_head)
    wanted = [k for k in own if k not in is_head or head_fits]
    missing = [k for k in wanted if k not in state]
    extra = [k for k in state if k not in own and not k.startswith(f"{head}.")]
    wrong = [k for k in wanted if k in state and state[k].shape != own[k].shape]
    for what, keys in (("lacks", missing), ("has keys the model lacks:", extra),
                       ("has other shapes for", wrong)):
        if keys:
            more = f" (and {len(keys) - 3} more)" if len(keys) > 3 else ""
            raise UserError(f"{path}: the weights of {meta['model_name']} do not fit this "
                            f"model: it {what} {', '.join(keys[:3])}{more}")
    with torch.no_grad():
        for k in wanted:
            own[k].copy_(state[k])
    return head_fits


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
