"""Render a list of row dicts as markdown, CSV or JSON (the CLI's tables and reports)."""

from __future__ import annotations

import csv
import io
import json


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def format_rows(rows: list[dict], fmt: str = "md") -> str:
    """Format rows (same keys, in order) as ``md``, ``csv`` or ``json``."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    columns = list(rows[0]) if rows else []
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue().rstrip("\n")
    if fmt != "md":
        raise ValueError(f"format {fmt!r}; expected md, csv or json")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
