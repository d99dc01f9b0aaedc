"""Pruning pays: the same search (space, seed, trial budget) with and without pruning.

    python bench/search_pruning.py [--space search_spaces/demo.yaml] [--trials 6] [--epochs 4]

Runs both searches on the local Ray, one after the other, and prints trial-epochs used, wall
time and the best configuration found side by side, with the ratios. Writes
bench/results/search_pruning.json. On the 2-core CPU machine the default takes ~15 minutes.
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


def run(space: dict, out: Path) -> dict:
    from qlnas.search.run import run_search

    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(space))
    t0 = time.perf_counter()
    rows = run_search(path, out)
    wall = time.perf_counter() - t0
    done = [r for r in rows if r["status"] == "completed"]
    best = max(done, key=lambda r: r["val_top1"]) if done else None
    return {"trials": len(rows), "trial_epochs": sum(r["epochs"] for r in rows),
            "statuses": {s: sum(r["status"] == s for r in rows) for s in
                         ("completed", "pruned", "diverged", "errored")},
            "best_model": best["model"] if best else None,
            "best_val_top1": best["val_top1"] if best else None, "wall_s": round(wall, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--space", default=str(ROOT / "search_spaces" / "demo.yaml"))
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--pruner", default="median", choices=("median", "hyperband", "asha"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "search_pruning.json"))
    args = p.parse_args(argv)

    base = yaml.safe_load(Path(args.space).read_text())
    base["search"]["num_trials"] = args.trials
    base["fixed"]["epochs"] = args.epochs
    results = {}
    with tempfile.TemporaryDirectory(prefix="qlnas-pruning-") as tmp:
        for label, pruner in (("no pruning", "none"), (f"{args.pruner} pruning", args.pruner)):
            space = dict(base, pruning={"pruner": pruner, "grace_epochs": 1})
            results[label] = run(space, Path(tmp) / pruner)
    (plain, pruned) = results.values()
    print(f"\n{args.trials} trials x up to {args.epochs} epochs, seed "
          f"{base['search'].get('seed', 0)}, space {args.space}")
    print("| | trial-epochs | wall s | best val top-1 | best model | statuses |")
    print("|---|---|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['trial_epochs']} | {r['wall_s']} | {r['best_val_top1']} | "
              f"{r['best_model']} | {r['statuses']} |")
    ratio = pruned["trial_epochs"] / max(plain["trial_epochs"], 1)
    print(f"trial-epochs with/without pruning: {ratio:.2f}x; wall time "
          f"{pruned['wall_s'] / max(plain['wall_s'], 1e-9):.2f}x")
    from qlnas.fileio import atomic_write_json

    atomic_write_json({"config": vars(args), "results": results, "epoch_ratio": ratio},
                      args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
