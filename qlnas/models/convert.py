"""Checkpoints of the authors' published QLNet (their timm ResNet fork) -> our model files.

Their layout names the stem ``conv1``/``bn1``, block b of stage s ``layer{s}.{b}`` with
``conv1.conv``/``conv1.bn`` (the coefficient conv and its BN), ``conv2``/``bn2`` (the 3x3
depthwise conv), ``conv3.conv``/``conv3.bn`` (back to the stream) and ``skip.conv``/``skip.bn``,
and the head ``fc``. Each maps to one module of `qlnet50_liu2023`, so a conversion renames
keys and never changes a number: the converted model computes their function exactly.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from qlnas.errors import UserError
from qlnas.models.io import save_model_file, weights_dtype
from qlnas.models.net import QLNet
from qlnas.models.spec import name_to_spec

MODEL_NAME = "qlnet50_liu2023"
WRAPPERS = ("state_dict", "model", "state_dict_ema")
"""timm's checkpoint keys that hold the weights, in the order they are looked for."""

# Our module name -> theirs, inside a block and outside.
_BLOCK = {"coef": "conv1.conv", "bn_coef": "conv1.bn", "dw": "conv2", "bn_dw": "bn2",
          "proj": "conv3.conv", "bn_out": "conv3.bn", "shortcut.conv": "skip.conv",
          "shortcut.bn": "skip.bn"}
_TOP = {"stem.conv": "conv1", "stem.bn": "bn1", "fc": "fc"}
_OPTIONAL = "num_batches_tracked"  # BN's step counter: no part of the function
_STAGE = re.compile(r"^stages\.(\d+)\.(\d+)\.(.+)\.(\w+)$")


def their_name(key: str) -> str:
    """The name in their layout of one of our state-dict keys."""
    m = _STAGE.match(key)
    if m:
        s, b, module, leaf = m.groups()
        return f"layer{int(s) + 1}.{b}.{_BLOCK[module]}.{leaf}"
    module, leaf = key.rsplit(".", 1)
    return f"{_TOP[module]}.{leaf}"


def is_liu2023_layout(state: dict) -> bool:
    """Does a (bare) state dict look like theirs: their stem and first block's names?"""
    return "conv1.weight" in state and "layer1.0.conv1.conv.weight" in state


def _listing(keys: list[str]) -> str:
    more = f" (and {len(keys) - 3} more)" if len(keys) > 3 else ""
    return ", ".join(keys[:3]) + more


def read_checkpoint(path: str | os.PathLike, ema: bool = False) -> dict[str, torch.Tensor]:
    """The bare state dict of a checkpoint: a state dict, timm's wrappers, or safetensors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input
        raise UserError(f"{path}: not a readable checkpoint ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a state dict, got a {type(data).__name__}")
    if "model_name" in data:
        raise UserError(f"{path}: already a qlnas model file ({data['model_name']}), not a "
                        "checkpoint in the authors' layout; nothing to convert")
    order = ("state_dict_ema", "model_ema") if ema else WRAPPERS
    if not all(isinstance(v, torch.Tensor) for v in data.values()):
        key = next((k for k in order if isinstance(data.get(k), dict)), None)
        if key is None:
            want = ", ".join(order)
            raise UserError(f"{path}: not a state dict, and holds none of {want} (its keys: "
                            f"{_listing(sorted(map(str, data)))})")
        data = data[key]
    elif ema:
        raise UserError(f"{path}: --ema: a bare state dict holds no EMA weights")
    if data and all(str(k).startswith("module.") for k in data):  # saved from DDP
        data = {k.removeprefix("module."): v for k, v in data.items()}
    return data


def convert_state(state: dict[str, torch.Tensor], source: str = "checkpoint") -> QLNet:
    """Our `qlnet50_liu2023` holding the weights of a state dict in their layout."""
    if not is_liu2023_layout(state):
        raise UserError(f"{source}: not a checkpoint in the authors' layout (expected "
                        f"conv1.weight, layer1.0.conv1.conv.weight, ...; it has "
                        f"{_listing(sorted(state))})")
    fc = state.get("fc.weight")
    if fc is None or fc.ndim != 2:
        raise UserError(f"{source}: no 2-D fc.weight to read the class count from")
    model = QLNet(name_to_spec(MODEL_NAME, num_classes=fc.shape[0]))
    model.to(weights_dtype(state))
    ours = model.state_dict()
    theirs = {their_name(k): k for k in ours}
    extra = [k for k in state if k not in theirs]
    missing = [t for t, k in theirs.items() if t not in state and not k.endswith(_OPTIONAL)]
    if extra:
        raise UserError(f"{source}: unexpected keys for {MODEL_NAME}: {_listing(extra)}")
    if missing:
        raise UserError(f"{source}: missing keys for {MODEL_NAME}: {_listing(missing)}")
    wrong = [f"{t} {tuple(state[t].shape)} (expected {tuple(ours[k].shape)})"
             for t, k in theirs.items() if t in state and state[t].shape != ours[k].shape]
    if wrong:
        raise UserError(f"{source}: shapes that do not fit {MODEL_NAME}: {_listing(wrong)}")
    mapped = {k: state[t] for t, k in theirs.items() if t in state}
    mapped.update({k: v for k, v in ours.items() if k not in mapped})  # absent step counters
    model.load_state_dict(mapped)
    return model


def convert_file(src: str | os.PathLike, out: str | os.PathLike, ema: bool = False) -> QLNet:
    """Convert `src` and write our model file `out` (atomically; nothing on error)."""
    model = convert_state(read_checkpoint(src, ema), str(src))
    save_model_file(out, model, MODEL_NAME, converted_from=Path(src).name,
                    converted_weights="ema" if ema else "model")
    return model
