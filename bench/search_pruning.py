"""Pruning pays: the same search (space, seed, trial budget) without pruning and with each pruner.

    python bench/search_pruning.py [--space search_spaces/demo.yaml] [--trials 6] [--epochs 4]
                                   [--pruners none,median,hyperband,asha]

Runs the searches on the local Ray, one after the other, and prints one column per pruner:
trial-epochs used (and their ratio to no pruning), wall time, the best configuration found
(by the search's objective at the last epoch, as the leaderboard ranks) and how many trials
completed, were pruned, diverged or errored. Writes bench/results/search_pruning.json. On the
2-core CPU machine the default (4 searches) takes about half an hour.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRUNERS = ("none", "median", "hyperband", "asha")
OUTCOMES = ("completed", "pruned", "diverged", "errored")


def run(space: dict, out: Path) -> dict:
    from qlnas.search.run import run_search

    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(space))
    t0 = time.perf_counter()
    rows = run_search(path, out, address="local")  # one new local Ray for all the searches
    wall = time.perf_counter() - t0
    best = next((r for r in rows if r["status"] == "completed"), None)  # the leaderboard's top
    return {"trials": len(rows),  # a reused result trained no epoch of its own
            "trial_epochs": sum(r["epochs"] for r in rows if not r.get("reused_from")),
            "reused": sum(bool(r.get("reused_from")) for r in rows),
            "statuses": {s: sum(r["status"] == s for r in rows) for s in OUTCOMES},
            "best_model": best["model"] if best else None,
            "best_recipe": best["recipe"] if best else None,
            "best_val_top1": best["val_top1"] if best else None, "wall_s": round(wall, 1)}


def table(results: dict[str, dict]) -> str:
    """One column per pruner; ratios against the first (no pruning)."""
    base = next(iter(results.values()))
    lines = ["| | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]

    def line(name: str, cell) -> None:
        lines.append(f"| {name} | " + " | ".join(str(cell(r)) for r in results.values()) + " |")

    line("trial-epochs", lambda r: r["trial_epochs"])
    line("trial-epochs vs first",
         lambda r: f"{r['trial_epochs'] / max(base['trial_epochs'], 1):.2f}x")
    line("wall s", lambda r: r["wall_s"])
    line("wall vs first", lambda r: f"{r['wall_s'] / max(base['wall_s'], 1e-9):.2f}x")
    line("best val top-1 (last epoch)", lambda r: r["best_val_top1"])
    line("best model", lambda r: r["best_model"])
    line("best recipe", lambda r: r["best_recipe"] or "-")
    line("reused (same config, not trained)", lambda r: r["reused"])
    line("completed/pruned/diverged/errored",
         lambda r: "/".join(str(r["statuses"][s]) for s in OUTCOMES))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--space", default=str(ROOT / "search_spaces" / "demo.yaml"))
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--pruners", default=",".join(PRUNERS),
                   help="comma-separated, run in this order; the first is the baseline")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "search_pruning.json"))
    args = p.parse_args(argv)
    pruners = [s.strip() for s in args.pruners.split(",") if s.strip()]
    unknown = [s for s in pruners if s not in PRUNERS]
    if unknown or not pruners:
        p.error(f"--pruners: {', '.join(unknown) or 'none given'}; expected some of "
                f"{', '.join(PRUNERS)}")

    base = yaml.safe_load(Path(args.space).read_text())
    base["search"]["num_trials"] = args.trials
    base["fixed"]["epochs"] = args.epochs
    results = {}
    with tempfile.TemporaryDirectory(prefix="qlnas-pruning-") as tmp:
        for pruner in pruners:
            space = dict(base, pruning={**base.get("pruning", {}), "pruner": pruner,
                                        "grace_epochs": 1})
            results[pruner] = run(space, Path(tmp) / pruner)
    print(f"\n{args.trials} trials x up to {args.epochs} epochs, seed "
          f"{base['search'].get('seed', 0)}, space {args.space}")
    print(table(results))
    from qlnas.fileio import atomic_write_json

    atomic_write_json({"config": vars(args), "results": results}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
