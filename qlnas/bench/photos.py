"""An ImageNet-like JPEG tree made from scikit-image's photos, generated, not downloaded.

Input of the loader and writer benchmarks (`qlnas bench loader`, `bench/writer.py`,
`bench/loader_memory.py`) and of the data tests' real-photo fixtures.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina",
          "immunohistochemistry", "logo", "colorwheel", "horse", "cell", "camera")
SIZE = (500, 375)  # ImageNet's typical photo


def _photo(name: str) -> np.ndarray:
    from skimage import data

    img = getattr(data, name)()
    if img.dtype != np.uint8:
        img = (255 * (img.astype(np.float64) / max(1.0, float(img.max())))).astype(np.uint8)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])


def make_jpegs(root: str | os.PathLike, count: int = 2000, quality: int = 90,
               seed: int = 0, size: tuple[int, int] = SIZE, grain: float = 0.0) -> Path:
    """An ImageFolder tree of `count` JPEGs of `size` (500x375 by default): random crops of
    scikit-image's photos, one class per photo, with Gaussian `grain` (sensor noise, so that
    photos upscaled past their resolution are not unnaturally smooth). Reused when complete."""
    from PIL import Image

    root = Path(root)
    shape = "" if size == SIZE and not grain else f"-{size[0]}x{size[1]}-{grain:g}"
    stamp = root / f".complete-{count}-{quality}-{seed}{shape}"
    if stamp.exists():
        return root
    rng = np.random.default_rng(seed)
    photos = {}
    for name in PHOTOS:
        try:
            photos[name] = Image.fromarray(_photo(name))
        except Exception:  # a photo this scikit-image version lacks
            continue
    names = sorted(photos)
    for n in range(count):
        name = names[n % len(names)]
        img = photos[name]
        w, h = img.size
        frac = rng.uniform(0.5, 1.0)
        cw = min(w, int(frac * min(w, h * 4 / 3)))
        ch = min(h, int(cw * 3 / 4))
        x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        out = img.crop((x, y, x + cw, y + ch)).resize(size, Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if grain:
            noisy = np.asarray(out, np.float32) + rng.normal(0, grain, (size[1], size[0], 3))
            out = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        out.save(folder / f"{n:05d}.jpg", quality=quality)
    stamp.touch()
    return root

