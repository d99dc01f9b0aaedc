"""Damaged copies of a `.beton`, as a disk, a copy or a network filesystem leaves them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from ffcv.reader import Reader

from qlnas.data.classes import classes_path


def damaged_copy(src: Path, dst: Path, where: str, seed: int = 0) -> Path:
    """`src` (and its class list) copied to `dst`, then damaged: `header` (its first 64 bytes
    random), `middle` (its middle third random), `end` (its last tenth random) or `truncated`
    (cut to half its size)."""
    shutil.copy(src, dst)
    shutil.copy(classes_path(src), classes_path(dst))
    size = os.path.getsize(dst)
    if where == "truncated":
        os.truncate(dst, size // 2)
        return dst
    first, last = {"header": (0, 64), "middle": (size // 3, 2 * size // 3),
                   "end": (size - size // 10, size)}[where]
    data = np.fromfile(dst, np.uint8)
    data[first:last] = np.random.default_rng(seed).integers(0, 256, last - first, np.uint8)
    data.tofile(dst)
    return dst


def samples_in(path: Path, first: int, last: int) -> tuple[set[int], set[int]]:
    """The samples of `path` whose bytes lie wholly, and those that lie partly, in first..last."""
    table = Reader(str(path)).alloc_table
    start, end = table["ptr"].astype(np.int64), (table["ptr"] + table["size"]).astype(np.int64)
    ids = table["sample_id"].astype(np.int64)
    inside = (start >= first) & (end <= last)
    touched = (end > first) & (start < last)
    return set(ids[inside].tolist()), set(ids[touched].tolist())
