"""FFCV data: writing `.beton` files, the embedded digits dataset, and the train/val loaders.

All FFCV imports live in this sub-package. The names below are imported lazily, so that
`import qlnas` (and the CLI's start-up) does not pay for numba and OpenCV.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "demo_dataset": "qlnas.data.demo",
    "read_classes": "qlnas.data.classes",
    "same_classes": "qlnas.data.classes",
    "build_train_loader": "qlnas.data.loaders",
    "build_val_loader": "qlnas.data.loaders",
    "resolution_for_epoch": "qlnas.data.loaders",
    "val_crop_pct": "qlnas.data.loaders",
    "ImageLoader": "qlnas.data.loaders",
    "write_beton": "qlnas.data.writer",
    "beton_info": "qlnas.data.info",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qlnas.data' has no attribute {name!r}")
