"""The class list stored beside each `.beton` file (`<beton>.classes.json`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from qlnas.errors import UserError
from qlnas.fileio import atomic_write_json


def classes_path(beton_path: str | os.PathLike) -> Path:
    """Where the class list of `beton_path` lives."""
    return Path(f"{os.fspath(beton_path)}.classes.json")


def write_classes(beton_path: str | os.PathLike, classes: list[str]) -> None:
    """Store the class names in label order beside `beton_path`."""
    atomic_write_json({"classes": list(classes)}, classes_path(beton_path))


def read_classes(beton_path: str | os.PathLike) -> list[str]:
    """The class names of `beton_path` in label order; UserError when the list is missing."""
    path = classes_path(beton_path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: class list not found (write the dataset with "
                        "'qlnas data write')") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg})") from None
    classes = data.get("classes") if isinstance(data, dict) else None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise UserError(f"{path}: field 'classes' must be a list of strings")
    return classes
