"""`.beton` writing: an ImageFolder tree, or a flat folder with a label file, -> FFCV file with
`image` and `label` fields. Every image is stored upright and RGB.

JPEGs are written with a restart marker every few MCUs (`restart_interval`), which lets the
scaled decoder (`qlnas.data.decoders`) cut the crop's region out of the entropy-coded data
without decoding the rest. Stock FFCV decoders read these files unchanged.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.rgb_image import IMAGE_MODES
from ffcv.writer import DatasetWriter

from qlnas.data.classes import write_classes
from qlnas.data.folder import Sample, check_images, load_rgb, read_subset, scan_folder
from qlnas.data.labels import read_known_classes, scan_labelled
from qlnas.errors import UserError
from qlnas.fileio import atomic_path

log = logging.getLogger(__name__)

WRITE_MODES = ("jpg", "raw", "smart", "proportion")
MCU = 16  # pixels per MCU side with 4:2:0 chroma subsampling, which the writer enforces
_RESTART_CHOICES = (4, 5, 3, 6, 8, 7, 2)


@dataclass
class WriteResult:
    """What `write_beton` wrote."""

    path: Path
    classes: list[str]
    num_samples: int
    skipped: list[str] = field(default_factory=list)
    conversions: dict[str, Any] = field(default_factory=dict)


def restart_interval(width: int) -> int:
    """MCUs per restart segment: a divisor of the MCUs per row, so segments tile each row."""
    per_row = -(-width // MCU)
    for k in _RESTART_CHOICES:
        if per_row % k == 0:
            return k
    return per_row


def encode_jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """RGB -> JPEG bytes (4:2:0, restart markers tiling each MCU row)."""
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality),
              cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420,
              cv2.IMWRITE_JPEG_RST_INTERVAL, restart_interval(image.shape[1])]
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError("OpenCV could not encode the image as JPEG")
    return buf.reshape(-1)


def fit_within(image: np.ndarray, max_res: int) -> np.ndarray:
    """FFCV's resize to a longest side of `max_res` (area interpolation, sizes truncated), but no
    side below one pixel (FFCV's makes a 1x700 image 0x512, and OpenCV raises)."""
    h, w = image.shape[:2]
    ratio = max_res / max(h, w)
    if ratio >= 1:
        return image
    size = (max(1, int(w * ratio)), max(1, int(h * ratio)))
    return cv2.resize(np.ascontiguousarray(image), size, interpolation=cv2.INTER_AREA)


def _encode_image(self: RGBImageField, destination, image, malloc) -> None:
    """RGBImageField.encode with `encode_jpeg` above (same metadata and file layout); never
    raises (a raise in FFCV's writer hangs it): a failure is counted, with the file named, and a
    black placeholder stored (the write then stops with an error)."""
    try:
        _encode(self, destination, image, malloc)
    except Exception:
        dataset = self.qlnas_dataset
        log.exception("%s: cannot encode image", dataset.current)
        dataset.count_failure()
        destination["mode"] = IMAGE_MODES["raw"]
        destination["height"], destination["width"] = 1, 1
        destination["data_ptr"], storage = malloc(3)
        storage[:] = 0


def _encode(self: RGBImageField, destination, image, malloc) -> None:
    mode = self.write_mode  # the image is resized already (fit_within)
    as_jpg = None
    if mode == "smart":
        mode = "jpg" if image.nbytes > self.smart_threshold else "raw"
    elif mode == "proportion":
        mode = "jpg" if np.random.rand() < self.proportion else "raw"
    destination["mode"] = IMAGE_MODES[mode]
    destination["height"], destination["width"] = image.shape[:2]
    if mode == "jpg":
        as_jpg = encode_jpeg(image, self.jpeg_quality)
        destination["data_ptr"], storage = malloc(as_jpg.nbytes)
        storage[:] = as_jpg
    else:
        destination["data_ptr"], storage = malloc(image.nbytes)
        storage[:] = image.reshape(-1)


class _FolderDataset:
    """Indexable (image, label) pairs for FFCV's writer; never raises (a raise hangs the writer)."""

    def __init__(self, samples: list[Sample], max_res: int) -> None:
        self.samples = samples
        self.max_res = max_res
        self.failures = multiprocessing.get_context("fork").Value("i", 0)
        self.current = ""  # the file being written, in this worker process (for errors)

    def __len__(self) -> int:
        return len(self.samples)

    def count_failure(self) -> None:
        with self.failures.get_lock():
            self.failures.value += 1

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        sample = self.samples[index]
        self.current = sample.path
        try:
            image = fit_within(load_rgb(sample.path, self.max_res), self.max_res)
        except Exception:  # checked before writing; a file changed since then
            log.exception("%s: cannot decode image", sample.path)
            self.count_failure()
            image = np.zeros((8, 8, 3), np.uint8)
        return image, sample.label


def write_beton(src: str | os.PathLike, out: str | os.PathLike, *, max_res: int = 512,
                quality: int | None = None, write_mode: str = "jpg",
                compress_probability: float | None = None,
                smart_threshold: int | None = None, subset: str | list[str] | None = None,
                limit_per_class: int | None = None, workers: int | None = None,
                skip_corrupt: bool = False, overwrite: bool = False,
                page_size: int = 8 << 20, labels: str | os.PathLike | None = None,
                known_classes: str | os.PathLike | None = None) -> WriteResult:
    """Write the ImageFolder tree `src` (or, with `labels`, the flat folder `src` that the label
    file names) to the FFCV file `out` and its class list beside it.

    Labels follow the sorted class names of the selection; `known_classes` (a `.beton` or a
    class list file, with `labels` only) is the list every label must come from, e.g. the
    train file's. The file appears under `out` only when complete. `page_size` is FFCV's
    allocation unit (a power of two, at least 2 MiB); `smart_threshold` (bytes, `smart` mode)
    defaults to a (max_res/2)^2 RGB image, `compress_probability` (`proportion` mode) to 0.5,
    `quality` (every mode that writes JPEGs) to 90. One given where its mode does not read it
    is refused, not ignored.
    """
    out = Path(out)
    if write_mode not in WRITE_MODES:
        raise UserError(f"--write-mode {write_mode}: expected one of {', '.join(WRITE_MODES)}")
    for flag, value, mode in (("--quality", quality, ("jpg", "smart", "proportion")),
                              ("--compress-probability", compress_probability, ("proportion",)),
                              ("--smart-threshold", smart_threshold, ("smart",))):
        if value is not None and write_mode not in mode:
            raise UserError(f"{flag} {value}: --write-mode {write_mode} does not use it "
                            f"(it goes with --write-mode {' or '.join(mode)})")
    quality = 90 if quality is None else quality
    compress_probability = 0.5 if compress_probability is None else compress_probability
    if not 1 <= quality <= 100:
        raise UserError(f"--quality {quality}: expected 1..100")
    if max_res < 8:
        raise UserError(f"--max-res {max_res}: expected at least 8")
    if not 0.0 <= compress_probability <= 1.0:
        raise UserError(f"--compress-probability {compress_probability}: expected 0..1")
    if smart_threshold is not None and smart_threshold < 0:
        raise UserError(f"--smart-threshold {smart_threshold}: expected bytes >= 0")
    if smart_threshold is None:
        smart_threshold = 3 * (max_res // 2) ** 2
    largest = 3 * max_res ** 2  # bytes of the largest raw sample the mode may store
    raw_limit = {"jpg": 0, "smart": min(largest, smart_threshold)}.get(write_mode, largest)
    if raw_limit > page_size:
        raise UserError(f"--max-res {max_res} with --write-mode {write_mode}: a raw image of "
                        f"up to {raw_limit / 2**20:.1f} MiB does not fit in FFCV's "
                        f"{page_size / 2**20:.0f} MiB page; lower --max-res (or "
                        "--smart-threshold) or use --write-mode jpg")
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists (use --overwrite to replace it)")
    if isinstance(subset, str):
        subset = read_subset(subset)
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    if labels is not None:
        known = read_known_classes(known_classes) if known_classes is not None else None
        classes, samples = scan_labelled(src, labels, subset, limit_per_class, known)
    elif known_classes is not None:
        raise UserError("--classes goes with --labels (class folders name their own classes)")
    else:
        classes, samples = scan_folder(src, subset, limit_per_class)
    samples, skipped, conversions = check_images(samples, workers, skip_corrupt)
    if not samples:
        raise UserError(f"{src}: no decodable images")
    image_field = RGBImageField(
        write_mode=write_mode, max_resolution=max_res, jpeg_quality=quality,
        compress_probability=compress_probability,
        smart_threshold=smart_threshold)
    # Instance override keeps type(field) == RGBImageField, so any FFCV reader opens the file.
    image_field.encode = _encode_image.__get__(image_field)
    dataset = _FolderDataset(samples, max_res)
    image_field.qlnas_dataset = dataset  # whose file is being encoded, for errors
    log.info("writing %d images of %d classes to %s", len(samples), len(classes), out)
    with atomic_path(out) as tmp:
        writer = DatasetWriter(str(tmp), {"image": image_field, "label": IntField()},
                               num_workers=min(workers, len(samples)), page_size=page_size)
        writer.from_indexed_dataset(dataset, chunksize=max(1, min(100, len(samples) // workers)))
        if dataset.failures.value:
            raise UserError(f"{src}: {dataset.failures.value} image(s) failed to decode or "
                            "encode while writing (named above; files changed during the "
                            "write?)")
        write_classes(out, classes, conversions, of=tmp)
    return WriteResult(out, classes, len(samples), skipped, conversions)
