"""What is inside a `.beton`: samples, classes, fields and image size statistics."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from qlnas.data.classes import classes_path, read_classes, read_conversions
from qlnas.data.integrity import open_beton
from qlnas.data.order import choose_mode, node_memory


def beton_info(path: str | os.PathLike) -> dict[str, Any]:
    """A summary of the file (sizes in pixels and bytes)."""
    path = os.fspath(path)
    reader = open_beton(path)
    info: dict[str, Any] = {
        "file": path,
        "bytes": os.path.getsize(path),
        "samples": int(reader.num_samples),
        "fields": {name: type(handler).__name__ for name, handler in reader.handlers.items()},
        "classes": read_classes(path) if classes_path(path).exists() else None,
        "conversions": read_conversions(path) if classes_path(path).exists() else None,
        "page_bytes": int(reader.page_size),
        "node_memory": node_memory(),
    }
    info["auto_mode"] = choose_mode(info["bytes"], info["node_memory"])
    meta = reader.metadata
    column = {name: f"f{i}" for i, name in enumerate(reader.handlers)}  # FFCV's field columns
    if "image" in column and len(meta):
        image = meta[column["image"]]
        h, w = image["height"].astype(np.int64), image["width"].astype(np.int64)
        info["image"] = {
            "height": _stats(h), "width": _stats(w),
            "jpeg_fraction": float(np.mean(image["mode"] == 0)),
            "mean_bytes": float(reader.alloc_table["size"].sum() / max(1, reader.num_samples)),
        }
    if "label" in column and len(meta):
        labels, counts = np.unique(meta[column["label"]], return_counts=True)
        info["labels"] = {"distinct": int(len(labels)), "min_count": int(counts.min()),
                          "max_count": int(counts.max())}
    return info


def _stats(values: np.ndarray) -> dict[str, float]:
    return {"min": int(values.min()), "mean": round(float(values.mean()), 1),
            "max": int(values.max())}


def format_info(info: dict[str, Any]) -> str:
    """The summary as aligned text lines."""
    lines = [f"file:     {info['file']} ({info['bytes'] / 2**20:.1f} MiB)",
             f"samples:  {info['samples']}",
             "fields:   " + ", ".join(f"{k} ({v})" for k, v in info["fields"].items())]
    classes = info["classes"]
    if classes is None:
        lines.append("classes:  (no class list beside the file)")
    else:
        shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
        lines.append(f"classes:  {len(classes)}: {shown}")
    if "labels" in info:
        lab = info["labels"]
        lines.append(f"labels:   {lab['distinct']} distinct, {lab['min_count']}.."
                     f"{lab['max_count']} samples each")
    if "image" in info:
        im = info["image"]
        for side in ("height", "width"):
            s = im[side]
            lines.append(f"{side + ':':9} min {s['min']}, mean {s['mean']}, max {s['max']}")
        lines.append(f"jpeg:     {im['jpeg_fraction']:.0%} of images, "
                     f"{im['mean_bytes'] / 1024:.1f} KiB per sample on average")
    lines.append("sources:  " + format_conversions(info.get("conversions")))
    lines.append(f"reading:  {info['auto_mode']} on this node under data_mode auto "
                 f"({info['node_memory'] / 2**30:.1f} GiB of memory; pages of "
                 f"{info['page_bytes'] >> 20} MiB)")
    return "\n".join(lines)


def format_conversions(conversions: dict[str, Any] | None) -> str:
    """'converted to RGB: 3 (CMYK 1, L 1, P 1); EXIF-rotated: 1; non-JPEG bytes re-encoded: 2
    (GIF 1, PNG 1)', from `qlnas.data.folder.conversion_counts`."""
    if conversions is None:
        return "conversions not recorded (written by an older qlnas)"

    def counted(by_kind: dict[str, int]) -> str:
        total = sum(by_kind.values())
        kinds = ", ".join(f"{kind} {n}" for kind, n in by_kind.items())
        return f"{total} ({kinds})" if total else "0"

    return (f"converted to RGB: {counted(conversions.get('converted_to_rgb', {}))}; "
            f"EXIF-rotated: {conversions.get('exif_rotated', 0)}; "
            f"non-JPEG bytes re-encoded: {counted(conversions.get('non_jpeg_reencoded', {}))}")
