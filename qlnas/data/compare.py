"""Stock FFCV's decoders next to ours, for the loader benchmark (`qlnas.bench.loader`).

`uint8_loader` is a plain FFCV loader over a `.beton` file that stops at a uint8 image tensor
(no normalisation, no device transfer), with either stock FFCV's decoder or ours, so that the
two are timed with nothing else differing. `random_crops` reads stored JPEGs and draws stock
FFCV's random-resized-crop boxes for them, to time the decoders alone
(`qlnas.data.decoders.decode_crop` against `decode_full`).
"""

from __future__ import annotations

import os

import numpy as np
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import (
    CenterCropRGBImageDecoder,
    RandomResizedCropRGBImageDecoder,
    get_random_crop,
)
from ffcv.loader import Loader, OrderOption
from ffcv.reader import Reader
from ffcv.transforms import RandomHorizontalFlip, ToTensor

from qlnas.data.center_crop import DEFAULT_CROP_PCT, CenterCropDecoder
from qlnas.data.decoders import ScaledRandomResizedCropDecoder
from qlnas.data.loaders import DECODERS, _max_sample_bytes

SPLITS = ("train", "val")


def uint8_loader(beton: str | os.PathLike, split: str, resolution: int, batch_size: int,
                 workers: int, decoder: str) -> Loader:
    """An FFCV loader of (uint8 images, labels) with `decoder` ("stock" or "scaled").

    train: random resized crop and flip, random order, the last partial batch dropped; val:
    timm's centre crop (`DEFAULT_CROP_PCT`), file order. Both read through the page cache.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; expected one of {', '.join(SPLITS)}")
    if decoder not in DECODERS:
        raise ValueError(f"decoder={decoder!r}; expected one of {', '.join(DECODERS)}")
    size = (resolution, resolution)
    label = [IntDecoder(), ToTensor()]
    if split == "val":
        if decoder == "stock":
            op = CenterCropRGBImageDecoder(size, DEFAULT_CROP_PCT)
        else:
            op = CenterCropDecoder(size, DEFAULT_CROP_PCT,
                                   max_jpeg_bytes=_max_sample_bytes(str(beton)))
        return Loader(str(beton), batch_size=batch_size, num_workers=workers,
                      order=OrderOption.SEQUENTIAL, os_cache=True,
                      pipelines={"image": [op, ToTensor()], "label": label})
    if decoder == "stock":
        op = RandomResizedCropRGBImageDecoder(size)
    else:
        op = ScaledRandomResizedCropDecoder(size, max_jpeg_bytes=_max_sample_bytes(str(beton)))
    return Loader(str(beton), batch_size=batch_size, num_workers=workers,
                  order=OrderOption.RANDOM, drop_last=True, os_cache=True, seed=0,
                  pipelines={"image": [op, RandomHorizontalFlip(), ToTensor()], "label": label})


def random_crops(beton: str | os.PathLike, samples: int, seed: int = 0
                 ) -> list[tuple[np.ndarray, tuple[int, int], tuple[int, int, int, int]]]:
    """(JPEG bytes, (height, width), crop box (i, j, h, w)) of `samples` random stored JPEGs
    (drawn with replacement; raw samples skipped), the boxes drawn as stock FFCV's training
    decoder draws them (scale 0.08-1, ratio 3/4-4/3)."""
    reader = Reader(str(beton))
    meta = reader.metadata["f0"]
    sizes = dict(zip(reader.alloc_table["sample_id"], reader.alloc_table["ptr"], strict=True))
    lengths = dict(zip(reader.alloc_table["sample_id"], reader.alloc_table["size"], strict=True))
    raw = np.fromfile(str(beton), dtype=np.uint8)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, reader.num_samples, samples)
    np.random.seed(seed)  # get_random_crop draws from numpy's global generator
    out = []
    for k in picks:
        if meta["mode"][k] != 0:
            continue
        ptr, size = int(sizes[k]), int(lengths[k])
        h, w = int(meta["height"][k]), int(meta["width"][k])
        box = get_random_crop(h, w, np.array((0.08, 1.0)), np.array((3 / 4, 4 / 3)))
        out.append((raw[ptr:ptr + size].copy(), (h, w), box))
    return out
