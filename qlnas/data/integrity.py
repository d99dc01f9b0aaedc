"""A `.beton`'s structure checked before anything reads it, and every sample decoded on request
(`qlnas data info --verify`), so that a damaged file is one clear error, never a traceback from
FFCV's reader, a hang, or garbage trained on."""

from __future__ import annotations

import concurrent.futures
import os
import types
from pathlib import Path

import numpy as np
from ffcv.libffcv import imdecode
from ffcv.reader import Reader
from ffcv.types import (
    ALLOC_TABLE_TYPE,
    CURRENT_VERSION,
    FieldDescType,
    HeaderType,
    get_handlers,
    get_metadata_type,
)
from numba import njit
from tqdm import tqdm

from qlnas.data.classes import classes_path, read_classes
from qlnas.errors import UserError

JPEG, RAW = 0, 1  # FFCV's image modes
MAX_SIDE = 65_535  # JPEG's limit


class DamagedFile(UserError):
    """The file is not a complete, consistent FFCV file."""


class CorruptSamples(UserError):
    """Samples of the file failed to decode."""


def open_beton(path: str | os.PathLike) -> Reader:
    """FFCV's Reader of `path` once its header, field table, metadata and allocation table are
    consistent with each other and with the file's size; else one DamagedFile line naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: dataset file not found")
    size = os.path.getsize(path)

    def damaged(what: str) -> DamagedFile:
        return DamagedFile(f"{path}: damaged or not an FFCV file: {what}; write it again "
                           "(qlnas data write)")

    if size < HeaderType.itemsize:
        raise damaged(f"{size} bytes, fewer than FFCV's {HeaderType.itemsize}-byte header")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if header["version"] != CURRENT_VERSION:
        raise damaged(f"format version {header['version']} (expected {CURRENT_VERSION})")
    fields, samples = int(header["num_fields"]), int(header["num_samples"])
    table = int(header["alloc_table_ptr"])
    descriptors_end = HeaderType.itemsize + fields * FieldDescType.itemsize
    if not 1 <= fields <= 64 or descriptors_end > size:
        raise damaged(f"its header declares {fields} fields")
    descriptors = np.fromfile(path, dtype=FieldDescType, count=fields,
                              offset=HeaderType.itemsize)
    try:
        handlers = get_handlers(descriptors)
        metadata_type = get_metadata_type(handlers)
    except Exception as exc:  # FFCV's own complaint about an unknown field type
        raise damaged(f"unreadable field table ({exc})") from None
    metadata_end = descriptors_end + samples * metadata_type.itemsize
    if table > size:
        raise damaged(f"truncated: {size} bytes, its allocation table starts at byte {table}")
    if metadata_end > table or (size - table) % ALLOC_TABLE_TYPE.itemsize:
        raise damaged(f"its header's sample count ({samples}) or allocation table offset "
                      f"({table}) does not fit its {size} bytes")
    reader = Reader(path)
    alloc = reader.alloc_table
    if len(alloc) and (alloc["sample_id"].max() >= samples or alloc["ptr"].min() < metadata_end
                       or (alloc["ptr"] + alloc["size"]).max() > table):
        raise damaged("its allocation table points outside the file's data")
    for name, column in image_columns(reader).items():
        _check_images(reader.metadata[column], alloc, name, damaged)
    return reader


def image_columns(reader: Reader) -> dict[str, str]:
    """Image field name -> its metadata column (FFCV names columns f0, f1, ...)."""
    return {name: f"f{i}" for i, (name, handler) in enumerate(reader.handlers.items())
            if type(handler).__name__ == "RGBImageField"}


def _check_images(meta: np.ndarray, alloc: np.ndarray, name: str, damaged) -> None:
    h, w = meta["height"].astype(np.int64), meta["width"].astype(np.int64)
    bad = (h < 1) | (w < 1) | (h > MAX_SIDE) | (w > MAX_SIDE) \
        | ~np.isin(meta["mode"], (JPEG, RAW)) | ~np.isin(meta["data_ptr"], alloc["ptr"])
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise damaged(f"field {name!r}: {int(bad.sum())} sample(s) with impossible sizes or "
                      f"data (the first: sample {first})")


def sample_sizes(meta: np.ndarray, alloc: np.ndarray) -> np.ndarray:
    """Bytes of each sample's allocation (the one its data_ptr points at)."""
    order = np.argsort(alloc["ptr"])
    at = np.searchsorted(alloc["ptr"][order], meta["data_ptr"])
    return alloc["size"][order][np.minimum(at, len(order) - 1)].astype(np.int64)


@njit(nogil=True)
def _decode_all(data, ptrs, sizes, heights, widths, modes, first, last, statuses, scratch):
    """Decode samples first..last at 1/8 scale (libjpeg still reads all their entropy-coded
    data); statuses[k]: 0 decoded, else damaged. Raw samples: their size is their check."""
    for k in range(first, last):
        h, w = heights[k], widths[k]
        if modes[k] == JPEG:
            jpeg = data[ptrs[k]:ptrs[k] + sizes[k]]
            statuses[k] = imdecode_all(jpeg, scratch, h, w, h, w, 0, 0, 1, 8, False, False)
        elif sizes[k] < h * w * 3:
            statuses[k] = -1


imdecode_all = njit(nogil=True)(imdecode)


def verify(path: str | os.PathLike, workers: int | None = None, progress: bool = True
           ) -> dict[str, list[int]]:
    """Image field -> the samples that fail to decode, after decoding every one."""
    reader = open_beton(path)
    data = np.memmap(os.fspath(path), dtype=np.uint8, mode="r")
    workers = max(1, workers or min(8, os.cpu_count() or 1))
    return {name: _verify_field(data, reader.metadata[column], reader.alloc_table, workers,
                                f"verify {Path(path).name}:{name}", progress)
            for name, column in image_columns(reader).items()}


def _verify_field(data: np.ndarray, meta: np.ndarray, alloc: np.ndarray, workers: int,
                  desc: str, progress: bool) -> list[int]:
    n = len(meta)
    ptrs = meta["data_ptr"].astype(np.int64)
    sizes = sample_sizes(meta, alloc)
    heights, widths = meta["height"].astype(np.int64), meta["width"].astype(np.int64)
    modes = meta["mode"].astype(np.int64)
    statuses = np.zeros(n, np.int64)
    scratch = int(((heights + 7) // 8 * ((widths + 7) // 8)).max(initial=1)) * 3
    chunk = max(1, min(2048, -(-n // (4 * workers))))
    # Fresh dispatchers per call: numba drops a shared callee's overloads when a caller that
    # used them is freed (a KeyError in the next call).
    scope = dict(_decode_all.py_func.__globals__, imdecode_all=njit(nogil=True)(imdecode))
    decode_all = njit(nogil=True)(types.FunctionType(_decode_all.py_func.__code__, scope))

    def run(first: int) -> int:
        last = min(n, first + chunk)
        decode_all(data, ptrs, sizes, heights, widths, modes, first, last, statuses,
                    np.empty(scratch, np.uint8))
        return last - first

    with concurrent.futures.ThreadPoolExecutor(workers) as pool, \
            tqdm(total=n, desc=desc, unit="img", disable=not progress) as bar:
        for done in pool.map(run, range(0, n, chunk)):
            bar.update(done)
    return np.flatnonzero(statuses != 0).tolist()


def describe_samples(path: str | os.PathLike, samples, limit: int = 10) -> str:
    """`sample 12 (class 'n01440764'), ...` for the first `limit` of `samples`."""
    samples = sorted(int(s) for s in samples)
    reader = Reader(os.fspath(path))
    labels = None
    if "label" in reader.handlers:
        labels = reader.metadata[f"f{list(reader.handlers).index('label')}"]
    classes = read_classes(path) if classes_path(path).exists() else None
    parts = []
    for s in samples[:limit]:
        if labels is None:
            parts.append(f"sample {s}")
            continue
        label = int(labels[s])
        name = classes[label] if classes is not None and 0 <= label < len(classes) else label
        parts.append(f"sample {s} (class {name!r})")
    more = f" and {len(samples) - limit} more" if len(samples) > limit else ""
    return ", ".join(parts) + more
