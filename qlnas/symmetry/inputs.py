"""What the symmetry commands read: a model name or file, and the inputs they check it on."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qlnas.errors import UserError
from qlnas.symmetry.streams import check_model


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
    """A batch of the embedded dataset (digits validation split, centre crop, normalised)."""
    from qlnas.data import build_val_loader, demo_dataset

    _, val = demo_dataset()
    loader = build_val_loader(val, batch_size=32, resolution=size, num_workers=1)
    for images, _ in loader:
        return images.contiguous().to(torch.float64)
    raise UserError(f"{val}: the embedded dataset is empty")
