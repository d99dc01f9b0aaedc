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


# The plots (qlnas/search/plots.py): the Pareto staircase over any two metrics, learning curves.

def _measured(out, trial_id, status, top1, params_m, gmacs, objectives=None, **extra):
    _trial(out, trial_id, status, top1=top1, objectives=objectives)
    path = out / "trials" / trial_id / "trial.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "params_m": params_m,
                                "gmacs": gmacs, **extra}))


@pytest.fixture
def figures(monkeypatch):
    """The figures write_report draws, by file name."""
    from qlnas.search import plots

    drawn, save = {}, plots._save

    def keep(fig, path):
        drawn[path.name] = fig
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return drawn


def _front_line(fig):
    (line,) = [ln for ln in fig.axes[0].get_lines() if ln.get_label().startswith("Pareto front")]
    return line


def _search(out, objectives=None):
    # (top1 at the last epoch, params_m, gmacs); c is dominated by b on every pair of axes here
    for trial_id, status, top1, params_m, gmacs in [
            ("a", "completed", 0.6, 1.0, 0.1), ("b", "completed", 0.7, 2.0, 0.2),
            ("c", "completed", 0.65, 3.0, 0.3), ("d", "completed", 0.8, 4.0, 0.4),
            ("p", "pruned", 0.9, 0.5, 0.05)]:  # would dominate all, but it did not complete
        _measured(out, trial_id, status, (0.3, top1), params_m, gmacs, objectives)


def test_pareto_plot_is_the_staircase_of_the_completed_non_dominated_trials(tmp_path, figures):
    from matplotlib.cbook import STEP_LOOKUP_MAP

    from qlnas.search import plots

    _search(tmp_path)
    _measured(tmp_path, "b2", "completed", (), 2.0, 0.2, reused_from="b")  # b's result again
    write_report(tmp_path)  # default axes: val_top1 (max) against params_m (min)
    line = _front_line(figures["pareto.png"])
    assert line.get_xydata().tolist() == [[1.0, 0.6], [2.0, 0.7], [4.0, 0.8]]  # not c, p, b2
    # x minimised: each point holds its accuracy rightwards until a bigger model beats it
    assert line.get_drawstyle() == "steps-post"
    steps = [(1.0, 0.6), (2.0, 0.6), (2.0, 0.7), (4.0, 0.7), (4.0, 0.8)]
    drawn = STEP_LOOKUP_MAP[line.get_drawstyle()](*line.get_xydata().T)
    assert list(zip(*drawn, strict=True)) == steps
    x, y = plots.pareto_axes(None, [])
    points = [{"trial": t, "status": "completed", "val_top1": v, "params_m": p}
              for t, v, p in [("d", 0.8, 4.0), ("c", 0.65, 3.0), ("b", 0.7, 2.0), ("a", 0.6, 1.0)]]
    front = plots.pareto_front(points, x, y)
    assert [p["trial"] for p in front] == ["a", "b", "d"]
    assert plots.staircase(front, x, y) == ("post", steps)
    assert "parameters" in figures["pareto.png"].axes[0].get_xlabel()


def test_pareto_plot_over_any_two_metrics_with_their_directions(tmp_path, figures, capsys):
    from matplotlib.cbook import STEP_LOOKUP_MAP

    from qlnas.cli import main

    _search(tmp_path)
    # y = gmacs (min), x = val_top1 (max): the front runs the other way, steps lean left
    assert main(["report", str(tmp_path), "--pareto", "gmacs,val_top1"]) == 0
    line = _front_line(figures["pareto.png"])
    assert line.get_xydata().tolist() == [[0.6, 0.1], [0.7, 0.2], [0.8, 0.4]]
    assert line.get_drawstyle() == "steps-pre"
    drawn = STEP_LOOKUP_MAP["steps-pre"](*line.get_xydata().T)
    assert list(zip(*drawn, strict=True)) == [(0.6, 0.1), (0.6, 0.2), (0.7, 0.2), (0.7, 0.4),
                                              (0.8, 0.4)]
    out = capsys.readouterr().out
    assert f"Pareto plot: {tmp_path / 'pareto.png'}" in out
    assert f"learning curves: {tmp_path / 'curves.png'}" in out


def test_pareto_axes_default_to_the_searchs_two_objectives_and_their_directions(tmp_path,
                                                                                  figures):
    from qlnas.search.plots import Axis, pareto_axes

    two = [{"metric": "val_top1", "mode": "max"}, {"metric": "gmacs", "mode": "min"}]
    _search(tmp_path, objectives=two)
    write_report(tmp_path)
    ax = figures["pareto.png"].axes[0]
    assert "GMACs" in ax.get_xlabel() and "val top-1" in ax.get_ylabel()
    assert _front_line(figures["pareto.png"]).get_xydata().tolist() == [
        [0.1, 0.6], [0.2, 0.7], [0.4, 0.8]]
    # the search's direction wins over the known default; one objective: the default axes
    odd = [{"metric": "val_loss", "mode": "min"}, {"metric": "params_m", "mode": "max"}]
    assert pareto_axes(None, odd) == (Axis("params_m", "max"), Axis("val_loss", "min"))
    assert pareto_axes("img_per_sec,train_loss", odd[:1]) == (Axis("train_loss", "min"),
                                                               Axis("img_per_sec", "max"))
    assert pareto_axes(None, odd[:1]) == (Axis("params_m", "min"), Axis("val_top1", "max"))


def test_learning_curves_per_trial_coloured_by_status_and_valid_pngs(tmp_path, figures):
    from matplotlib.colors import to_hex
    from PIL import Image

    from qlnas.search.plots import STATUS_COLORS

    _search(tmp_path)
    _measured(tmp_path, "nan", "diverged", (0.2, 0.0), 1.0, 0.1)
    _trial(tmp_path, "oom", "errored", top1=(0.1,), error="CUDA out of memory")
    _trial(tmp_path, "early", "errored", error="bad batch size")  # no epoch: no curve
    rows = write_report(tmp_path)
    ax = figures["curves.png"].axes[0]
    curves = {ln.get_gid(): ln for ln in ax.get_lines() if ln.get_gid()}
    status = {r["trial"]: r["status"] for r in rows}
    assert sorted(curves) == sorted(set(status) - {"early"})
    for trial, line in curves.items():
        assert to_hex(line.get_color()) == to_hex(STATUS_COLORS[status[trial]]), trial
    assert curves["d"].get_xydata().tolist() == [[1.0, 0.3], [2.0, 0.8]]
    assert curves["nan"].get_xydata().tolist() == [[1.0, 0.2], [2.0, 0.0]]
    legend = {t.get_text() for t in ax.get_legend().get_texts()}
    assert legend == {"completed (4)", "pruned (1)", "diverged (1)", "errored (2)"}
    pareto_legend = {t.get_text() for t in figures["pareto.png"].axes[0].get_legend().get_texts()}
    assert {"completed (4)", "pruned (1)", "Pareto front (3)"} <= pareto_legend
    for name in ("pareto.png", "curves.png"):
        with Image.open(tmp_path / name) as image:
            image.verify()
            assert image.format == "PNG"
        with Image.open(tmp_path / name) as image:
            assert len(image.convert("RGB").getcolors(1 << 20)) > 50, name  # not blank


@pytest.mark.parametrize("spec, message", [
    ("val_top1,flops", "--pareto val_top1,flops: unknown metric 'flops' (known: val_top1, "),
    ("val_top1", "--pareto val_top1: expected two different metrics"),
    ("gmacs,gmacs", "--pareto gmacs,gmacs: expected two different metrics"),
])
def test_a_bad_pareto_is_one_line_and_writes_nothing(tmp_path, capsys, spec, message):
    from qlnas.cli import main

    _search(tmp_path)
    assert main(["report", str(tmp_path), "--pareto", spec]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    if "unknown" in message:
        assert "val_top5" in err and "img_per_sec" in err  # the known ones are named
    assert not (tmp_path / "leaderboard.md").exists() and not (tmp_path / "pareto.png").exists()
