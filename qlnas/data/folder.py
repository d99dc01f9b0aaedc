"""Reading an ImageFolder tree (`<split>/<class>/<image>`): class selection and image loading
(every image as upright RGB, with counts of what was converted)."""

from __future__ import annotations

import importlib.resources
import io
import logging
import os
from collections import Counter
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps

from qlnas.errors import UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"})
BUILTIN_SUBSETS = ("imagenet100",)


@dataclass(frozen=True)
class Sample:
    """One image file and its label (the index of its class in the sorted selection)."""

    path: str
    label: int


def read_subset(spec: str) -> list[str]:
    """Class folder names from a built-in list (`imagenet100`) or a file with one name a line."""
    if spec in BUILTIN_SUBSETS:
        text = importlib.resources.files("qlnas.data").joinpath(f"{spec}.txt").read_text()
    else:
        try:
            text = Path(spec).read_text()
        except OSError as exc:
            raise UserError(f"--subset {spec}: cannot read the class list ({exc.strerror}); "
                            f"expected a file or one of {', '.join(BUILTIN_SUBSETS)}") from None
    names = [line.strip() for line in text.splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise UserError(f"--subset {spec}: the class list is empty")
    return names


def select_classes(present: list[str], subset: list[str] | None, where: str) -> list[str]:
    """The sorted class names of the selection: all `present` ones, or the `--subset` ones
    (each of which must be present)."""
    if subset is None:
        return sorted(present)
    missing = sorted(set(subset) - set(present))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"{where}: class '{missing[0]}'{more} from --subset is not there")
    return sorted(set(subset))


def check_limit(limit_per_class: int | None) -> None:
    if limit_per_class is not None and limit_per_class < 1:
        raise UserError(f"--limit-per-class {limit_per_class}: expected a positive number")


def scan_folder(src: str | os.PathLike, subset: list[str] | None = None,
                limit_per_class: int | None = None) -> tuple[list[str], list[Sample]]:
    """The sorted class names and the samples of an ImageFolder tree."""
    src = Path(src)
    if not src.is_dir():
        raise UserError(f"{src}: source folder not found (expected <src>/<class>/<image>)")
    present = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not present:
        raise UserError(f"{src}: no class folders (expected <src>/<class>/<image>)")
    classes = select_classes(present, subset, str(src))
    check_limit(limit_per_class)
    samples = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (src / name).iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        samples += [Sample(str(p), label) for p in files[:limit_per_class]]
    if not samples:
        raise UserError(f"{src}: no images in the selected class folders "
                        f"(suffixes {', '.join(sorted(IMAGE_SUFFIXES))})")
    return classes, samples


def load_rgb(path: str, max_res: int | None = None) -> np.ndarray:
    """Decode an image file to an upright HxWx3 uint8 RGB array, whatever its mode or format.

    JPEGs are decoded at the smallest DCT scale whose size still reaches `max_res` (the writer
    then downsizes with area interpolation), which makes writing large photos much faster.
    """
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as img:
        if max_res is not None and img.format == "JPEG":
            w, h = img.size
            ratio = max_res / max(w, h)
            if ratio < 0.5:
                img.draft("RGB", (max(1, int(w * ratio)), max(1, int(h * ratio))))
        upright = ImageOps.exif_transpose(img)
        if upright.mode.startswith("I;16"):  # PIL's convert clips 16 bits to 8: all white
            grey = (np.asarray(upright).astype(np.uint32) + 128) // 257
            return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)
        return np.asarray(upright.convert("RGB"))


@dataclass(frozen=True)
class Source:
    """What an image file holds before `load_rgb` makes it RGB and upright."""

    mode: str  # PIL's mode on disk: RGB, L, CMYK, P, RGBA, ...
    format: str  # of the bytes, whatever the file name says: JPEG, PNG, GIF, ...
    rotated: bool  # an EXIF orientation other than upright


def _check(path: str) -> Source | str:
    """What `path` holds when it decodes, else the reason it does not."""
    try:
        with Image.open(path) as img:
            source = Source(img.mode, img.format or "unknown",
                            img.getexif().get(ExifTags.Base.Orientation, 1) in range(2, 9))
            if img.format == "JPEG":  # a 1/8 scale decode still reads all the entropy data
                img.draft("RGB", (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
            img.load()
        if img.mode in ("I", "F"):  # no 8-bit reading without knowing the pixels' range
            return f"{img.mode} pixels (32-bit {'integers' if img.mode == 'I' else 'floats'})"
        return source
    except Exception as exc:  # any failure to decode means a corrupt file
        return f"{type(exc).__name__}: {exc}"


def conversion_counts(sources: list[Source]) -> dict[str, Any]:
    """How many images `load_rgb` converts, and from what (stored with the dataset)."""
    modes = Counter(s.mode for s in sources if s.mode != "RGB")
    formats = Counter(s.format for s in sources if s.format != "JPEG")
    return {"converted_to_rgb": dict(sorted(modes.items())),
            "exif_rotated": sum(s.rotated for s in sources),
            "non_jpeg_reencoded": dict(sorted(formats.items()))}


def check_images(samples: list[Sample], workers: int,
                 skip_corrupt: bool) -> tuple[list[Sample], list[str], dict[str, Any]]:
    """The decodable samples, the skipped paths and their `conversion_counts`; UserError on the
    first bad one unless skipping.

    FFCV's writer hangs when a worker dies, so every file is checked before writing starts.
    """
    from tqdm import tqdm

    paths = [s.path for s in samples]
    chunks = max(1, min(256, len(paths) // (8 * max(1, workers))))
    good, skipped, sources = [], [], []
    with Pool(max(1, workers)) as pool:
        results = pool.imap(_check, paths, chunksize=chunks)
        for sample, result in zip(samples, tqdm(results, total=len(paths), desc="checking",
                                                unit="img", leave=False), strict=True):
            if isinstance(result, Source):
                good.append(sample)
                sources.append(result)
            elif skip_corrupt:
                skipped.append(sample.path)
            else:
                raise UserError(f"{sample.path}: cannot decode image ({result}); "
                                "use --skip-corrupt to leave such files out")
    return good, skipped, conversion_counts(sources)
