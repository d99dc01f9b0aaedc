"""Search results from the files under a search folder: leaderboard, plots, best config.

Works at any time (during or after a search, without Ray): every trial keeps
``trials/<id>/trial.json`` (spec, status, times) and its run folder (metrics.csv, result.json).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path

import yaml

from qlnas.errors import UserError
from qlnas.fileio import atomic_write_text
from qlnas.tables import format_rows

log = logging.getLogger(__name__)

STATUSES = ("completed", "pruned", "diverged", "errored", "infeasible", "running")
DEFAULT_OBJECTIVE = {"metric": "val_top1", "mode": "max"}


def _label(trial: dict) -> str:
    from qlnas.models.spec import ArchSpec, spec_to_name

    spec = trial.get("spec")
    if spec:
        try:
            return spec_to_name(ArchSpec.from_dict(spec))
        except ValueError:
            pass
    return trial.get("model", "?")


def read_record(trial_dir: Path) -> dict:
    """A trial's record (its trial.json); {} when it has none yet or it cannot be read."""
    try:
        return json.loads((trial_dir / "trial.json").read_text())
    except (OSError, ValueError):
        return {}


def read_history(run_dir: Path, typed: bool = False) -> list[dict]:
    """A run's epochs from its metrics.csv (`typed`: numbers and booleans, not strings)."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with path.open() as f:
        rows = [row for row in csv.DictReader(f) if row.get("epoch")]
    return [{k: _value(v) for k, v in row.items()} for row in rows] if typed else rows


def _value(text: str) -> object:
    if text in ("True", "False"):
        return text == "True"
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


def objective_values(last: dict, metrics: list[str]) -> list[float] | None:
    """A trial's objective value(s): each metric at the trial's last epoch (None if missing).

    The last epoch, not the best one: it is the model the trial exports and what retraining
    its configuration (best_config.yaml) reproduces, while a maximum over noisy epochs favours
    trials by their noise. Optuna (COMPLETE values), the leaderboard and best_config.yaml all
    use this value. `last`: the last epoch's metrics with the trial's params_m and gmacs.
    """
    values = []
    for metric in metrics:
        try:
            value = float(last[metric])
        except (KeyError, TypeError, ValueError):
            return None
        if not math.isfinite(value):
            return None
        values.append(value)
    return values


def collect(out: Path) -> list[dict]:
    """One row per trial: completed ones first, best by the search's first objective (at the
    last epoch, see `objective_values`), then pruned, diverged, errored and running ones."""
    entries, objective = [], DEFAULT_OBJECTIVE
    order = {s: i for i, s in enumerate(STATUSES)}
    optuna_trials = _optuna_trials(out)
    for path in sorted((out / "trials").glob("*/trial.json")):
        try:
            trial = json.loads(path.read_text())
        except (OSError, ValueError):
            log.warning("unreadable %s", path)
            continue
        if trial.get("status") == "continued":  # its Optuna trial continues in another one
            continue
        objective = (trial.get("objectives") or [objective])[0]
        source = trial.get("reused_from") or trial["trial_id"]  # a reused result: its source's
        history = read_history(out / "trials" / source / "run")
        last = {**(history[-1] if history else {}), "params_m": trial.get("params_m"),
                "gmacs": trial.get("gmacs")}
        top1 = objective_values(last, ["val_top1"])
        value = objective_values(last, [objective["metric"]])
        rec = dict(trial.get("params", {}))
        row = {
            "trial": trial["trial_id"], "model": _label(trial),
            "params_m": _round(trial.get("params_m")), "gmacs": _round(trial.get("gmacs")),
            "gmacs_224": _round(trial.get("gmacs_224")),
            "val_top1": round(top1[0], 4) if top1 else None, "epochs": len(history),
            "status": trial["status"],
            "wall_s": round((trial.get("ended") or time.time()) - trial["started"], 1),
            "recipe": " ".join(f"{k}={_fmt(v)}" for k, v in rec.items()
                               if k not in ("form", "act", "act_at", "weight_sharing",
                                            "expansion", "model")),
        }
        if objective["metric"] not in row:
            row[objective["metric"]] = round(value[0], 4) if value else None
        ot = optuna_trials.get(trial["trial_id"])
        if ot is None and trial.get("optuna_trial") is not None:
            ot = optuna_trials.get(int(trial["optuna_trial"]))
        if optuna_trials:
            row["optuna"] = f"#{ot.number} {ot.state.name}" if ot is not None else ""
        row["error"] = (trial.get("error") or "").replace("|", "/")
        row["reused_from"] = trial.get("reused_from") or ""  # the same config: not trained again
        sign = -1.0 if objective["mode"] == "max" else 1.0
        entries.append(((order.get(row["status"], 9), value is None,
                         sign * value[0] if value else 0.0), row))
    entries.sort(key=lambda e: e[0])
    return [row for _, row in entries]


def _optuna_trials(out: Path) -> dict:
    """The search's Optuna trials by Tune trial id and by number ({} without a study)."""
    from qlnas.search.study import find_study_ref, tune_trials

    ref = find_study_ref(out)
    if ref is None:
        return {}
    try:
        study = ref.load()
    except UserError as exc:
        log.warning("%s", exc)
        return {}
    trials = study.get_trials(deepcopy=False)
    return {**{t.number: t for t in trials}, **tune_trials(study)}


def _round(value: float | None) -> float | None:
    return round(value, 3) if isinstance(value, int | float) else None


def _fmt(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _objectives(out: Path) -> list[dict]:
    """The search's objectives ({metric, mode}) from space.json, else from a trial's record."""
    records = [out / "space.json", *sorted((out / "trials").glob("*/trial.json"))[:1]]
    for path in records:
        try:
            objectives = json.loads(path.read_text()).get("objectives")
        except (OSError, ValueError, AttributeError):
            continue
        if objectives:
            return objectives
    return [DEFAULT_OBJECTIVE]


def _histories(out: Path, rows: list[dict]) -> dict[str, list[dict]]:
    """Each row's epochs (typed); a reused result's are its source's."""
    return {r["trial"]: read_history(out / "trials" / (r["reused_from"] or r["trial"]) / "run",
                                     typed=True) for r in rows}


def write_plots(out: Path, rows: list[dict], pareto: str | None = None) -> list[Path]:
    """pareto.png (the front over `pareto`'s two metrics, see `plots.pareto_axes`) and
    curves.png (every trial's val top-1 by epoch); their paths."""
    from qlnas.search import plots

    x, y = plots.pareto_axes(pareto, _objectives(out))
    histories = _histories(out, rows)
    points = [{**(histories[r["trial"]] or [{}])[-1],  # every metric at the last epoch
               **{k: v for k, v in r.items() if v is not None}} for r in rows]
    return [plots.plot_pareto(points, x, y, out / "pareto.png"),
            plots.plot_curves(rows, histories, out / "curves.png")]


def write_report(out: str | Path, pareto: str | None = None) -> list[dict]:
    """Write leaderboard.md/.csv, pareto.png and curves.png (`write_plots`; `pareto`: its two
    metrics, "Y,X") and best_config.yaml; return the rows."""
    from qlnas.search.plots import pareto_axes

    out = Path(out)
    if not (out / "trials").is_dir():
        raise UserError(f"{out}: no search results here (no trials/ folder)")
    pareto_axes(pareto, _objectives(out))  # a bad --pareto: before anything is written
    rows = collect(out)
    atomic_write_text(format_rows(rows, "md") + "\n", out / "leaderboard.md")
    atomic_write_text(format_rows(rows, "csv") + "\n", out / "leaderboard.csv")
    if rows:
        write_plots(out, rows, pareto)
    best = next((r for r in rows if r["status"] == "completed"), None)
    if best is not None:  # the leaderboard's first row: the best objective at the last epoch
        trial = json.loads((out / "trials" / best["trial"] / "trial.json").read_text())
        objective = (trial.get("objectives") or [DEFAULT_OBJECTIVE])[0]
        config = dict(trial["train_config"], out=f"runs/best-{best['trial']}")
        text = (f"# Best trial {best['trial']} ({best['model']}, {objective['metric']} "
                f"{best[objective['metric']]} at its last epoch) of {out}\n"
                "# Train it: qlnas train --config THIS_FILE\n")
        atomic_write_text(text + yaml.safe_dump(config, sort_keys=False), out / "best_config.yaml")
    return rows
