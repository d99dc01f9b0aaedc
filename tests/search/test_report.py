"""Leaderboard and best config from the files of a search (no Ray): one objective value."""

import csv
import json

import pytest
import yaml

from qlnas.search.report import write_report


def _trial(out, trial_id, status, top1=(), error=None, objectives=None):
    folder = out / "trials" / trial_id
    (folder / "run").mkdir(parents=True)
    record = {"trial_id": trial_id, "params": {"lr": 0.1}, "status": status, "started": 100.0,
              "ended": 160.0, "error": error}
    if status != "errored":
        record.update(spec=None, model="qlnet26n", params_m=1.5, gmacs=0.2,
                      train_config={"model": "qlnet26n", "epochs": len(top1)})
    if objectives:
        record["objectives"] = objectives
    (folder / "trial.json").write_text(json.dumps(record))
    if top1:
        rows = ["epoch,val_top1,val_loss"] + [f"{i},{v},{1 - v}" for i, v in enumerate(top1, 1)]
        (folder / "run" / "metrics.csv").write_text("\n".join(rows) + "\n")


def test_trials_rank_by_their_last_epoch_and_errors_are_listed(tmp_path):
    _trial(tmp_path, "peaked", "completed", top1=(0.5, 0.9, 0.6))
    _trial(tmp_path, "steady", "completed", top1=(0.5, 0.6, 0.7))
    _trial(tmp_path, "broken", "errored", error="batch_size=63 is not divisible by the 2 "
           "processes")
    rows = write_report(tmp_path)
    assert [r["trial"] for r in rows] == ["steady", "peaked", "broken"]
    assert rows[0]["val_top1"] == 0.7 and rows[1]["val_top1"] == 0.6
    assert "Best trial steady" in (tmp_path / "best_config.yaml").read_text()
    with open(tmp_path / "leaderboard.csv") as f:
        by_trial = {r["trial"]: r for r in csv.DictReader(f)}
    assert by_trial["broken"]["status"] == "errored"
    assert by_trial["broken"]["error"] == "batch_size=63 is not divisible by the 2 processes"
    assert by_trial["steady"]["error"] == ""
    assert "batch_size=63 is not divisible" in (tmp_path / "leaderboard.md").read_text()


def test_a_minimised_objective_ranks_lowest_first(tmp_path):
    objectives = [{"metric": "val_loss", "mode": "min"}]
    _trial(tmp_path, "a", "completed", top1=(0.5, 0.6), objectives=objectives)  # loss 0.4
    _trial(tmp_path, "b", "completed", top1=(0.5, 0.8), objectives=objectives)  # loss 0.2
    rows = write_report(tmp_path)
    assert [r["trial"] for r in rows] == ["b", "a"]
    assert rows[0]["val_loss"] == pytest.approx(0.2)
    text = (tmp_path / "best_config.yaml").read_text()
    assert "Best trial b" in text and yaml.safe_load(text)["out"] == "runs/best-b"
