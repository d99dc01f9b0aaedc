"""The train-step table: ratios to resnet50, the printed columns, the issue's targets, the PNG."""

from __future__ import annotations

import logging
import os
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


def results_dir(out: str | None) -> Path:
    """Where results go: --out, else $OUT (what the device machine sends back), else
    bench/results."""
    return Path(out or os.environ.get("OUT") or "bench/results")


def write_result(result: dict, out: Path, label: str, plot_png, note: str = "") -> None:
    """`label`.json (written whole or not at all) and `label`.png, drawn by `plot_png`."""
    from qlnas.fileio import atomic_write_json

    atomic_write_json(result, out / f"{label}.json")
    plot_png(result, out / f"{label}.png")
    print(f"wrote {out / (label + '.json')} and .png{note}")


def same_columns(rows: list[dict]) -> list[dict]:
    """Every row with every row's keys (blank where it has none), so a table has one header."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return [{k: row.get(k, "") for k in keys} for row in rows]


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
    return same_columns(out)


CPU_TRAIN = 2.0
GPU_TRAIN, GPU_INFER, GPU_EVERY_TRAIN = 1.2, 1.5, 1.0
GPU_HEADLINE = ("qlnet50_eq3_softball_ds", "qlnet50_glb_softball_ds")


def targets(rows: list[dict], device: str = "cpu") -> dict:
    """The speed targets, as ratios to resnet50 in the same run. CPU: Eq.(3) softball trains
    at >= 2.0x. GPU: Eq.(3) and glb softball train at >= 1.2x and infer at >= 1.5x, and every
    other model of the table trains at >= 1.0x."""
    by_name = {r["model"]: r for r in rows if "error" not in r}
    if device == "cpu":
        eq3 = by_name.get(GPU_HEADLINE[0], {})
        return {"eq3_train_ratio": eq3.get("train_ratio"),
                "eq3_train_met": (eq3.get("train_ratio") or 0) >= CPU_TRAIN}
    out: dict = {}
    for name in GPU_HEADLINE:
        r = by_name.get(name, {})
        short = name.split("_")[1]
        out[f"{short}_train_ratio"] = r.get("train_ratio")
        out[f"{short}_train_met"] = (r.get("train_ratio") or 0) >= GPU_TRAIN
        out[f"{short}_infer_ratio"] = r.get("infer_ratio")
        out[f"{short}_infer_met"] = (r.get("infer_ratio") or 0) >= GPU_INFER
    slow = sorted(m for m, r in by_name.items()
                  if m.startswith("qlnet") and (r.get("train_ratio") or 0) < GPU_EVERY_TRAIN)
    out["train_below_1.0"] = slow
    return out


def best_of(results: list[dict]) -> list[dict]:
    """One row per model with each phase's fastest run among `results` (e.g. eager and
    compiled); ``{phase}_from`` names the run it came from and ``{phase}_compile_s`` is that
    run's first step where it compiled. Ratios are recomputed on the merged rows."""
    merged: dict[str, dict] = {}
    for result in results:
        compiled = result["config"].get("compile", False)
        for r in result["rows"]:
            row = merged.setdefault(r["model"], {"model": r["model"]})
            if "error" in r:
                row.setdefault("errors", []).append(f"{result['label']}: {r['error']}")
                continue
            row.update(params_m=r["params_m"], gmacs=r["gmacs"])
            for phase in ("train", "infer"):
                key = f"{phase}_img_s"
                if key in r and r[key] > row.get(key, 0.0):
                    row[key] = r[key]
                    row[f"{phase}_peak_mb"] = r[f"{phase}_peak_mb"]
                    row[f"{phase}_from"] = result["label"]
                    if compiled:
                        row[f"{phase}_compile_s"] = r.get(f"{phase}_first_s")
                    else:
                        row.pop(f"{phase}_compile_s", None)
    rows = []
    for row in merged.values():
        errors = row.pop("errors", [])
        if "gmacs" not in row:
            row["error"] = "; ".join(errors)
        rows.append(row)
    return add_ratios(rows)


def best_table(rows: list[dict]) -> list[dict]:
    """The printed columns of `best_of`'s rows: speeds, ratios, which run, compile time."""
    out = []
    for r in rows:
        if "error" in r:
            out.append({"model": r["model"], "error": r["error"]})
            continue
        row = {"model": r["model"], "gmacs": round(r["gmacs"], 3)}
        for phase in ("train", "infer"):
            if f"{phase}_img_s" in r:
                row[f"{phase}_img_s"] = round(r[f"{phase}_img_s"], 1)
                row[f"{phase}_x_r50"] = round(r.get(f"{phase}_ratio", float("nan")), 2)
                row[f"{phase}_from"] = r[f"{phase}_from"]
                compile_s = r.get(f"{phase}_compile_s")
                row[f"{phase}_compile_s"] = round(compile_s, 1) if compile_s else ""
        out.append(row)
    return same_columns(out)


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


def main(argv: list[str] | None = None) -> int:
    """`python -m qlnas.bench.report --best A.json B.json ...`: each model's fastest run per
    phase among train-step results of one device (bench/gpu.sh: eager and compiled), with the
    targets."""
    import argparse
    import json
    import sys

    from qlnas.fileio import atomic_write_json
    from qlnas.tables import format_rows

    p = argparse.ArgumentParser(prog="python -m qlnas.bench.report", description=main.__doc__)
    p.add_argument("--best", nargs="+", required=True, help="train-step result JSON files")
    p.add_argument("--label", default="best")
    p.add_argument("--out", default=None, help="folder (default: $OUT, else bench/results)")
    args = p.parse_args(argv)
    results = []
    for path in args.best:
        try:
            results.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            return 2
    devices = {r["config"]["device"] for r in results}
    if len(devices) != 1:
        print(f"error: --best mixes devices {sorted(devices)}; give runs of one device",
              file=sys.stderr)
        return 2
    rows = best_of(results)
    device = devices.pop()
    merged = {"label": args.label, "sources": [r["label"] for r in results],
              "machine": results[0]["machine"], "config": results[0]["config"], "rows": rows,
              "targets": targets(rows, device)}
    print(f"\n## {args.label}: fastest of {', '.join(merged['sources'])}")
    print(format_rows(best_table(rows)))
    print(f"\ntargets: {json.dumps(merged['targets'])}")
    atomic_write_json(merged, results_dir(args.out) / f"{args.label}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
