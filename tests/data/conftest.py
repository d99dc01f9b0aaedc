"""Shared data fixtures: small real JPEG trees and `.beton` files, built once per session."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from ffcv.reader import Reader
from PIL import Image


@pytest.fixture(scope="session")
def photo_tree(tmp_path_factory) -> Path:
    """36 JPEGs of 500x375 (quality 90) made from scikit-image's photos, one class per photo."""
    from qlnas.bench.photos import make_jpegs

    return make_jpegs(tmp_path_factory.mktemp("photos"), count=36)


@pytest.fixture(scope="session")
def photo_beton(photo_tree, tmp_path_factory) -> Path:
    from qlnas.data.writer import write_beton

    out = tmp_path_factory.mktemp("photo-beton") / "photos.beton"
    write_beton(photo_tree, out, max_res=512, quality=90, workers=2)
    return out


@pytest.fixture(scope="session")
def demo_betons(tmp_path_factory) -> tuple[Path, Path]:
    from qlnas.data.demo import demo_dataset

    return demo_dataset(tmp_path_factory.mktemp("demo"))


def make_tree(root: Path, counts: dict[str, int], size: tuple[int, int] = (48, 40),
              seed: int = 0) -> Path:
    """An ImageFolder tree with smooth random JPEGs: counts = {class name: images}."""
    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for n in range(count):
            small = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
            img.save(root / name / f"{n:03d}.jpg", quality=95)
    return root


def stored_images(path) -> list[tuple[int, np.ndarray]]:
    """(label, decoded HxWx3 RGB image) per sample, straight from the file's bytes."""
    reader = Reader(str(path))
    raw = np.fromfile(str(path), np.uint8)
    where = {int(s): (int(p), int(n)) for s, p, n in reader.alloc_table}
    out = []
    for k in range(reader.num_samples):
        ptr, size = where[k]
        bgr = cv2.imdecode(raw[ptr:ptr + size], cv2.IMREAD_COLOR)
        out.append((int(reader.metadata["f1"][k]), bgr[..., ::-1]))
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255 ** 2 / max(mse, 1e-12))


def jpegs_of(path, count: int) -> list[tuple[np.ndarray, int, int]]:
    """(JPEG bytes, height, width) of the first `count` samples, straight from the file."""
    reader = Reader(str(path))
    raw = np.fromfile(str(path), np.uint8)
    meta = reader.metadata["f0"]
    where = {int(s): (int(p), int(n)) for s, p, n in reader.alloc_table}
    return [(raw[where[k][0]:where[k][0] + where[k][1]].copy(), int(meta["height"][k]),
             int(meta["width"][k])) for k in range(count)]
