"""The class list stored beside each `.beton` file (`<beton>.classes.json`), with what the
writer converted on the way (FFCV files have no room for such metadata)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from qlnas.errors import UserError
from qlnas.fileio import atomic_write_json


def classes_path(beton_path: str | os.PathLike) -> Path:
    """Where the class list of `beton_path` lives."""
    return Path(f"{os.fspath(beton_path)}.classes.json")


def write_classes(beton_path: str | os.PathLike, classes: list[str],
                  conversions: dict[str, Any] | None = None,
                  of: str | os.PathLike | None = None) -> None:
    """Store the class names in label order beside `beton_path`, and the writer's
    `conversions` (`qlnas.data.folder.conversion_counts`) when given. `of`, the file they
    belong to (the writer's temporary one), is fingerprinted so that a reader can tell a
    list of another write."""
    data: dict[str, Any] = {"classes": list(classes)}
    if conversions is not None:
        data["conversions"] = conversions
    if of is not None:
        data["beton"] = fingerprint(of)
    atomic_write_json(data, classes_path(beton_path))


def fingerprint(path: str | os.PathLike) -> str:
    """Size and a hash of the last 64 KiB: FFCV puts the allocation table (each sample's
    place and byte count) at the end, so two writes of one size differ there."""
    import hashlib

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(max(0, size - (64 << 10)))
        return f"{size}:{hashlib.sha1(f.read()).hexdigest()}"


def _read(beton_path: str | os.PathLike) -> tuple[Path, Any]:
    path = classes_path(beton_path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: class list not found (write the dataset with "
                        "'qlnas data write')") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg})") from None
    # The list is renamed into place just before the file: a write killed between the two
    # (with --overwrite) leaves the new list beside the old file.
    written_for = data.get("beton") if isinstance(data, dict) else None
    if isinstance(written_for, str) and os.path.isfile(beton_path) \
            and fingerprint(beton_path) != written_for:
        raise UserError(f"{path}: written for another {Path(beton_path).name} than the one "
                        "beside it (size or allocation table differ): the two are from "
                        "different writes (one killed while replacing it?); write it again "
                        "with --overwrite")
    return path, data


def same_classes(train: str | os.PathLike, val: str | os.PathLike) -> list[str]:
    """The class list of `train`; UserError when `val`'s is another (its label k would be
    another class than train's label k, and validation would score against the wrong one)."""
    ours, theirs = read_classes(train), read_classes(val)
    if ours == theirs:
        return ours
    k = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
             min(len(ours), len(theirs)))
    got = f"'{theirs[k]}'" if k < len(theirs) else "nothing"
    want = f"'{ours[k]}'" if k < len(ours) else "nothing"
    raise UserError(f"{val}: its {len(theirs)} classes are not the {len(ours)} of {train} "
                    f"(label {k} is {got}, not {want}); write it with the same --subset, or "
                    f"with --classes {train}")


def read_conversions(beton_path: str | os.PathLike) -> dict[str, Any] | None:
    """What the writer converted to RGB, rotated and re-encoded; None for files written before
    it was recorded."""
    _, data = _read(beton_path)
    conversions = data.get("conversions") if isinstance(data, dict) else None
    return conversions if isinstance(conversions, dict) else None


def read_classes(beton_path: str | os.PathLike) -> list[str]:
    """The class names of `beton_path` in label order; UserError when the list is missing."""
    path, data = _read(beton_path)
    classes = data.get("classes") if isinstance(data, dict) else None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise UserError(f"{path}: field 'classes' must be a list of strings")
    return classes
