"""Shared data fixtures: small real JPEG trees and `.beton` files, built once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def photo_tree(tmp_path_factory) -> Path:
    """36 JPEGs of 500x375 (quality 90) made from scikit-image's photos, one class per photo."""
    from qlnas.data.bench import make_jpegs

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
