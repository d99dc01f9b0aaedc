"""A flat image folder with a label file (ImageNet's validation layout) -> classes and samples.

Two label formats, told apart by their first line: Kaggle's `LOC_val_solution.csv` (header
`ImageId,PredictionString`, the first wnid of each prediction string is the label, image ids
without extension) and a plain list of `filename wnid` lines. Classes are ordered as for class
folders (sorted names of the selection), so train and val labels agree.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from qlnas.data.classes import classes_path, read_classes
from qlnas.data.folder import IMAGE_SUFFIXES, Sample, check_limit, select_classes
from qlnas.errors import UserError

log = logging.getLogger(__name__)

LOC_HEADER = ("ImageId", "PredictionString")


def read_labels(path: str | os.PathLike) -> dict[str, tuple[str, int]]:
    """{image name or id: (class, line number)} from a label file of either format."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--labels {path}: cannot read the label file ({exc})") from None
    first = next((n for n, line in enumerate(lines) if line.strip()), None)
    if first is None:
        raise UserError(f"--labels {path}: the label file is empty")
    if tuple(c.strip() for c in lines[first].split(",")) == LOC_HEADER:
        entries = _loc_entries(path, lines, first + 1)
    else:
        entries = _list_entries(path, lines)
    labels: dict[str, tuple[str, int]] = {}
    for name, wnid, number in entries:
        if name in labels:
            raise UserError(f"{path} line {number}: '{name}' is labelled again (first at line "
                            f"{labels[name][1]})")
        labels[name] = (wnid, number)
    return labels


def _loc_entries(path: Path, lines: list[str], start: int):
    """(image id, first wnid, line number) of each `ImageId,wnid x1 y1 x2 y2 ...` row."""
    for number, row in enumerate(csv.reader(lines[start:]), start + 1):
        if not row or not "".join(row).strip():
            continue
        groups = row[1].split() if len(row) == 2 else []
        if not (row[0].strip() and groups and len(groups) % 5 == 0
                and all(v.lstrip("-").isdigit() for v in groups[1:5])):
            raise UserError(f"{path} line {number}: expected 'ImageId,wnid x1 y1 x2 y2 ...', "
                            f"got {lines[number - 1][:80]!r}")
        yield row[0].strip(), groups[0], number


def _list_entries(path: Path, lines: list[str]):
    """(file name, wnid, line number) of each `filename wnid` line."""
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise UserError(f"{path} line {number}: expected 'filename wnid' (or the "
                            f"LOC_val_solution.csv header {','.join(LOC_HEADER)}), "
                            f"got {line[:80]!r}")
        yield parts[0], parts[1], number


def read_known_classes(spec: str | os.PathLike) -> list[str]:
    """The class names a label may use: a `.beton`'s class list (its `.classes.json`), that
    JSON itself, or a text file whose lines start with a class name (LOC_synset_mapping.txt)."""
    path = Path(spec)
    if path.name.endswith(".classes.json"):
        return read_classes(str(path)[:-len(".classes.json")])
    if classes_path(path).exists():
        return read_classes(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--classes {path}: cannot read the class list ({exc})") from None
    names = [line.split()[0] for line in lines if line.strip() and not line.startswith("#")]
    if not names:
        raise UserError(f"--classes {path}: the class list is empty")
    return names


def scan_labelled(src: str | os.PathLike, labels_file: str | os.PathLike,
                  subset: list[str] | None = None, limit_per_class: int | None = None,
                  known: list[str] | None = None) -> tuple[list[str], list[Sample]]:
    """The sorted class names and the samples of the flat folder `src` labelled by
    `labels_file`. Every image must have a label and every label an image; with `known`, every
    label of a selected class a class of that list (which then is the class list, so that
    classes without images keep their index); `subset` selects classes as it does for class
    folders (ImageNet's val labels all 1,000: the others are dropped)."""
    src, labels_file = Path(src), Path(labels_file)
    if not src.is_dir():
        raise UserError(f"{src}: source folder not found (expected a flat folder of images "
                        "with --labels)")
    check_limit(limit_per_class)
    files = sorted(p for p in src.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{src}: no images (suffixes {', '.join(sorted(IMAGE_SUFFIXES))})")
    labels = read_labels(labels_file)
    by_key = {p.name: p for p in files}
    for p in files:  # LOC_val_solution.csv names images without their extension
        by_key.setdefault(p.stem, p)
    allowed = set(known) if known is not None else None
    wanted = set(subset) if subset is not None else None  # labels of other classes are dropped
    labelled: dict[Path, str] = {}
    for name, (wnid, number) in labels.items():
        image = by_key.get(name)
        if image is None:
            raise UserError(f"{labels_file} line {number}: image '{name}' is not in {src}")
        if image in labelled:
            raise UserError(f"{labels_file} line {number}: '{name}' labels {image.name} again")
        if allowed is not None and wnid not in allowed and (wanted is None or wnid in wanted):
            raise UserError(f"{labels_file} line {number}: class '{wnid}' of '{name}' is not "
                            f"one of the {len(known)} known classes (--classes)")
        labelled[image] = wnid
    unlabelled = [p for p in files if p not in labelled]
    if unlabelled:
        more = f" (and {len(unlabelled) - 1} more)" if len(unlabelled) > 1 else ""
        raise UserError(f"{unlabelled[0]}: no label in {labels_file}{more}")
    present = sorted(known if known is not None else set(labelled.values()))
    classes = select_classes(present, subset, f"{labels_file}")
    index = {name: label for label, name in enumerate(classes)}
    per_class: dict[str, list[Path]] = {name: [] for name in classes}
    for image, wnid in labelled.items():
        if wnid in index:
            per_class[wnid].append(image)
    samples = [Sample(str(p), index[name])
               for name in classes for p in sorted(per_class[name])[:limit_per_class]]
    empty = [name for name in classes if not per_class[name]]
    if empty:
        log.warning("%d of %d classes have no image in %s (first: %s)", len(empty),
                    len(classes), src, empty[0])
    if not samples:
        raise UserError(f"{src}: no images of the selected classes in {labels_file}")
    return classes, samples
