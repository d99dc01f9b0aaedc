"""The embedded dataset: scikit-learn's 1,797 handwritten digits as 32x32 RGB JPEGs in `.beton`s.

Built once through the same writer as real data and cached (`$QLNAS_CACHE`, else
`~/.cache/qlnas`); concurrent callers wait on a file lock and then reuse the result.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DEMO_VERSION = "digits-v1"  # bump when the layout or the images change
SIZE = 32
VAL_FRACTION = 0.2
SPLIT_SEED = 0


def default_cache_dir() -> Path:
    """`$QLNAS_CACHE`, else `~/.cache/qlnas`."""
    root = os.environ.get("QLNAS_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "qlnas"


def digits_split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'train'|'val': (Nx32x32x3 uint8 images, N labels)}, a deterministic stratified split."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = []
    for img in digits.images:  # 8x8, values 0..16
        gray = Image.fromarray(np.round(img * (255 / 16)).astype(np.uint8))
        big = gray.resize((SIZE, SIZE), Image.Resampling.BICUBIC)
        images.append(np.asarray(big.convert("RGB")))
    images = np.stack(images)
    labels = digits.target.astype(np.int64)
    xtr, xva, ytr, yva = train_test_split(images, labels, test_size=VAL_FRACTION,
                                          stratify=labels, random_state=SPLIT_SEED)
    return {"train": (xtr, ytr), "val": (xva, yva)}


def _write_tree(root: Path) -> None:
    """The digits as an ImageFolder tree: root/{train,val}/<digit>/<n>.jpg."""
    from PIL import Image

    for split, (images, labels) in digits_split().items():
        for n, (img, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{n:04d}.jpg", quality=95)


def _ready(out: Path) -> bool:
    return all((out / f"{s}.beton").exists() and (out / f"{s}.beton.classes.json").exists()
               for s in ("train", "val"))


def demo_dataset(root: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Paths of the digits `train.beton` and `val.beton`, building them on first use."""
    out = Path(root) if root is not None else default_cache_dir() / DEMO_VERSION
    if _ready(out):
        return out / "train.beton", out / "val.beton"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here, then finds it built
        if not _ready(out):
            _build(out)
    return out / "train.beton", out / "val.beton"


def _build(out: Path) -> None:
    from qlnas.data.writer import write_beton

    log.info("building the digits demo dataset in %s", out)
    tree = Path(tempfile.mkdtemp(prefix=".tree.", dir=out))
    try:
        _write_tree(tree)
        for split in ("train", "val"):
            write_beton(tree / split, out / f"{split}.beton", max_res=SIZE, quality=95,
                        write_mode="jpg", workers=min(2, os.cpu_count() or 1), overwrite=True,
                        page_size=2 << 20)
    finally:
        shutil.rmtree(tree, ignore_errors=True)
