"""What the symmetry commands read: a model name or file, and the inputs they check it on."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qlnas.errors import UserError
from qlnas.symmetry.streams import check_model

SAMPLE_IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "cat", "immunohistochemistry",
                 "hubble_deep_field", "colorwheel")
"""Photographs shipped inside scikit-image (no download): the embedded image batch."""
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def load_model(source: str) -> tuple[nn.Module, dict, bool]:
    """(model, metadata, is_file) from a model file (any qlnas checkpoint or plain file) or a
    registered qlnet model name (a fresh model)."""
    import timm

    import qlnas.models  # noqa: F401 - registers the qlnet models
    from qlnas.models.io import load_model_file

    if Path(source).exists():
        model, meta = load_model_file(source)
        return check_model(model), meta, True
    if source in timm.list_models("qlnet*"):
        return timm.create_model(source), {"model_name": source}, False
    raise UserError(f"{source}: neither a model file nor a registered qlnet model name "
                    "(see `qlnas models`)")


def random_inputs(batch: int, size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=gen, dtype=torch.float64)


def image_batch(size: int = 64) -> torch.Tensor:
    """The sample photos, centre-cropped, resized to size x size, ImageNet-normalised."""
    import skimage.data

    images = []
    for name in SAMPLE_IMAGES:
        img = torch.as_tensor(getattr(skimage.data, name)()[..., :3], dtype=torch.float64)
        h, w = img.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        img = img[top:top + side, left:left + side].permute(2, 0, 1).unsqueeze(0) / 255.0
        images.append(F.interpolate(img, size=(size, size), mode="bilinear", antialias=True,
                                    align_corners=False))
    x = torch.cat(images)
    mean = torch.tensor(MEAN, dtype=torch.float64).reshape(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float64).reshape(1, 3, 1, 1)
    return (x - mean) / std
