"""The train-step table: ratios to resnet50, the printed columns, the issue's targets, the PNG."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

BASELINE = "resnet50"


def add_ratios(rows: list[dict], baseline: str = BASELINE) -> list[dict]:
    """Ratios to the baseline: speed, and speed per MAC (MAC throughput)."""
    base = next((r for r in rows if r["model"] == baseline and "error" not in r), None)
    for r in rows:
        if base is None or "error" in r:
            continue
        for phase in ("train", "infer"):
            key = f"{phase}_img_s"
            if key in r and key in base:
                r[f"{phase}_ratio"] = r[key] / base[key]
                r[f"{phase}_mac_ratio"] = r[key] * r["gmacs"] / (base[key] * base["gmacs"])
    return rows


def table_rows(rows: list[dict]) -> list[dict]:
    """The printed columns of each row."""
    out = []
    for r in rows:
        if "error" in r:
            out.append({"model": r["model"], "error": r["error"]})
            continue
        row = {"model": r["model"], "params_m": round(r["params_m"], 2),
               "gmacs": round(r["gmacs"], 3)}
        for phase in ("train", "infer"):
            if f"{phase}_img_s" in r:
                row[f"{phase}_img_s"] = round(r[f"{phase}_img_s"], 1)
                row[f"{phase}_x_r50"] = round(r.get(f"{phase}_ratio", float("nan")), 2)
                row[f"{phase}_per_mac_x_r50"] = round(r.get(f"{phase}_mac_ratio", float("nan")), 2)
                row[f"{phase}_peak_mb"] = round(r[f"{phase}_peak_mb"])
        if r.get("train_first_s") is not None and "train_img_s" in r:
            row["train_first_s"] = round(r["train_first_s"], 1)
        row["load"] = "/".join(f"{v:.1f}" for v in r.get("load_avg", []))
        out.append(row)
    keys = list(dict.fromkeys(k for row in out for k in row))
    return [{k: row.get(k, "") for k in keys} for row in out]


def targets(rows: list[dict], model: str = "qlnet50_eq3_softball_ds") -> dict:
    """The issue's targets: Eq.(3) train >= 2.0x and inference >= 2.2x resnet50; no model
    more than 20% slower per MAC than resnet50."""
    eq3 = next((r for r in rows if r["model"] == model), {})
    per_mac = {r["model"]: r.get("train_mac_ratio") for r in rows if "train_mac_ratio" in r}
    per_mac_inf = {r["model"]: r.get("infer_mac_ratio") for r in rows if "infer_mac_ratio" in r}
    return {
        "eq3_train_ratio": eq3.get("train_ratio"),
        "eq3_train_met": (eq3.get("train_ratio") or 0) >= 2.0,
        "eq3_infer_ratio": eq3.get("infer_ratio"),
        "eq3_infer_met": (eq3.get("infer_ratio") or 0) >= 2.2,
        "per_mac_train_below_0.8": sorted(m for m, v in per_mac.items() if v < 0.8),
        "per_mac_infer_below_0.8": sorted(m for m, v in per_mac_inf.items() if v < 0.8),
    }


def print_result(result: dict) -> None:
    """The run's table (and its sweep's) as printed by the CLI."""
    from qlnas.tables import format_rows
    c = result["config"]
    print(f"\n## {result['label']} ({result['machine'].get('gpu') or result['machine']['cpu']}, "
          f"{c['threads']} threads, {c['resolution']} px, batch {c['batch']})")
    print(format_rows(table_rows(result["rows"])))
    for point in result.get("sweep", []):
        print(f"\n### sweep: {point['resolution']} px, batch {point['batch']}")
        print(format_rows(table_rows(point["rows"])))


def plot(result: dict, path: Path) -> None:
    """Bar chart of the train and inference ratios to resnet50 (one group per model)."""
    try:
        import matplotlib
    except ImportError:
        log.info("matplotlib not installed: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qlnas.fileio import atomic_path

    rows = [r for r in result["rows"] if "train_ratio" in r or "infer_ratio" in r]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    xs = range(len(rows))
    for i, (phase, label) in enumerate((("train", "train step"), ("infer", "inference"))):
        vals = [r.get(f"{phase}_ratio", 0.0) for r in rows]
        ax.bar([x + (i - 0.5) * 0.4 for x in xs], vals, width=0.4, label=label)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(list(xs), [r["model"].replace("qlnet50_", "") for r in rows], rotation=40,
                  ha="right", fontsize=8)
    ax.set_ylabel("images/s relative to resnet50")
    c = result["config"]
    ax.set_title(f"{result['label']}: {c['device']}, {c['resolution']} px, batch {c['batch']}, "
                 f"{c['threads']} threads", fontsize=9)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
