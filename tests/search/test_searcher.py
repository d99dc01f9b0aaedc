"""The searcher over a study in real Optuna storage (journal file, SQLite): what a notebook
sees through `optuna.load_study`, a restart that leaves no trial behind, constraints checked
before anything trains."""

import json

import optuna
import pytest

from qlnas.errors import UserError
from qlnas.search.run import store_space
from qlnas.search.searcher import QLOptunaSearch
from qlnas.search.space import load_space
from qlnas.search.study import StudyRef, prepare_study, study_ref, warm_start_trials
from qlnas.search.trial import ConfigFacts

State = optuna.trial.TrialState


def lr_space(trial):
    trial.suggest_float("lr", 0.1, 1.0)


def searcher_on(ref: StudyRef, out, **kwargs) -> QLOptunaSearch:
    return QLOptunaSearch(space=lr_space, metric="val_top1", mode="max",
                          sampler=optuna.samplers.RandomSampler(seed=0), max_epochs=2,
                          study_name=ref.name, storage=ref.open_storage(), out=str(out),
                          **kwargs)


def finish(out, searcher, trial_id: str, curve: list[float]) -> None:
    """A trial's files as trial_driver and fit leave them, then its completion."""
    run = out / "trials" / trial_id / "run"
    run.mkdir(parents=True)
    lines = ["epoch,val_top1"] + [f"{i},{v}" for i, v in enumerate(curve, 1)]
    (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    (out / "trials" / trial_id / "trial.json").write_text(json.dumps(
        {"trial_id": trial_id, "status": "completed", "spec": {"form": "eq3"},
         "model": "qlnet26n", "params_m": 1.5, "gmacs": 0.1, "started": 1.0, "ended": 2.0,
         "params": {"lr": 0.5}, "train_config": {"model": "qlnet26n", "lr": 0.5}}))
    for epoch, value in enumerate(curve, 1):
        searcher.report_and_ask(trial_id, {"epoch": epoch, "val_top1": value}, epoch)
    searcher.on_trial_complete(trial_id, {"epoch": len(curve), "val_top1": curve[-1]})


@pytest.mark.parametrize("storage", [None, "sqlite"])
def test_the_study_is_in_storage_with_each_trials_record(tmp_path, storage):
    url = f"sqlite:///{tmp_path}/search.db" if storage else None
    ref = prepare_study("demo", url, tmp_path)
    assert study_ref(tmp_path) == ref
    assert ref.is_journal == (storage is None)
    searcher = searcher_on(ref, tmp_path)
    searcher.suggest("t1")
    searcher.suggest("t2")
    finish(tmp_path, searcher, "t1", [0.4, 0.6])
    # A notebook, with what the report prints: one study, t1 complete with its record.
    study = eval(ref.snippet(), {"optuna": optuna})
    trials = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
    assert set(trials) == {"t1", "t2"}
    t1 = trials["t1"]
    assert t1.state == State.COMPLETE and t1.value == 0.6
    assert t1.intermediate_values == {1: 0.4, 2: 0.6}
    assert t1.user_attrs["curve"] == [0.4, 0.6] and t1.user_attrs["status"] == "completed"
    assert t1.user_attrs["spec"] == {"form": "eq3"} and t1.user_attrs["params_m"] == 1.5
    assert trials["t2"].state == State.RUNNING
    with pytest.raises(UserError, match="already holds a study named 'demo'"):
        prepare_study("demo", url, tmp_path)


def test_a_restarted_driver_continues_the_trials_asked_after_its_checkpoint(tmp_path):
    """Tune's checkpoint of the searcher predates t2's suggestion when the driver dies: the
    restored searcher gives that Optuna trial (same parameters) to the next Tune trial, so the
    study holds each configuration once and none stays RUNNING."""
    ref = prepare_study("demo", None, tmp_path)
    searcher = searcher_on(ref, tmp_path)
    searcher.suggest("t1")
    searcher.save(str(tmp_path / "checkpoint.pkl"))  # Tune's last checkpoint
    lost = searcher.suggest("t2")
    (tmp_path / "trials" / "t2").mkdir(parents=True)
    (tmp_path / "trials" / "t2" / "trial.json").write_text(
        json.dumps({"trial_id": "t2", "status": "running"}))
    # The driver dies; a new one restores the checkpoint (the launch-time object, then its
    # state, as Tuner.restore does).
    restored = searcher_on(ref, tmp_path)
    restored.restore(str(tmp_path / "checkpoint.pkl"))
    assert restored.suggest("t3") == lost
    finish(tmp_path, restored, "t1", [0.5, 0.7])
    finish(tmp_path, restored, "t3", [0.3, 0.4])
    study = ref.load()
    assert len(study.trials) == 2
    assert {t.user_attrs["tune_trial_id"]: t.state for t in study.trials} == \
        {"t1": State.COMPLETE, "t3": State.COMPLETE}
    record = json.loads((tmp_path / "trials" / "t2" / "trial.json").read_text())
    assert record["status"] == "continued" and record["continued_as"] == "t3"


SPACE = """\
fixed: {model: qlnet26n, epochs: 1, warmup_epochs: 0, resolution: 32}
arch:
  form: [eq3, glb]
  expansion: [2, 8]
constraints:
  params_m: {max: LIMIT}
search: {num_trials: 4, searcher: grid}
"""


def constrained(tmp_path, limit: float):
    path = tmp_path / "space.yaml"
    path.write_text(SPACE.replace("LIMIT", str(limit)))
    space = load_space(path)
    facts = ConfigFacts(space)
    sizes = {(f, e): facts({"form": f, "expansion": e})[2]["params_m"]
             for f in ("eq3", "glb") for e in (2, 8)}
    return space, facts, sizes


def test_an_infeasible_configuration_is_told_and_never_returned(tmp_path):
    space, facts, sizes = constrained(tmp_path, 1.0)
    limit = sorted(sizes.values())[1] + 1e-6  # two of the four grid points fit
    space, facts, _ = constrained(tmp_path, limit)
    ref = prepare_study("c", None, tmp_path)
    searcher = QLOptunaSearch(
        space=lambda t: space.sample(t), metric="val_top1", mode="max",
        sampler=optuna.samplers.GridSampler(space.grid(), seed=0), max_epochs=1,
        study_name=ref.name, storage=ref.open_storage(), out=str(tmp_path),
        constraints=space.constraints, facts_of=facts, grid_size=4)
    given = [searcher.suggest(f"t{i}") for i in range(4)]
    feasible = [p for p in given if isinstance(p, dict)]
    assert sorted(sizes[(p["form"], p["expansion"])] for p in feasible) == \
        sorted(v for v in sizes.values() if v <= limit)
    assert given[2:] == ["FINISHED", "FINISHED"]  # the grid is done: nothing is repeated
    study = ref.load()
    assert len(study.trials) == 4
    for trial in study.trials:
        size = sizes[(trial.params["form"], trial.params["expansion"])]
        assert trial.constraints == {"params_m": pytest.approx(size - limit)}
        if size > limit:  # the sampler sees it as infeasible; the leaderboard lists it
            assert trial.state == State.PRUNED and trial.user_attrs["status"] == "infeasible"
            record = json.loads((tmp_path / "trials" / f"infeasible-{trial.number:05d}"
                                 / "trial.json").read_text())
            assert record["status"] == "infeasible" and "params_m" in record["error"]
            assert not (tmp_path / "trials" / f"infeasible-{trial.number:05d}" / "run").exists()
        else:
            assert trial.state == State.RUNNING


def test_a_study_left_by_a_search_that_failed_to_start_is_replaced(tmp_path):
    # Its enqueued trials (WAITING) and warm-start copies went in before the first trial ran:
    # the same command again was refused ("already holds a study"), and --resume had nothing.
    url = f"sqlite:///{tmp_path}/search.db"
    lr = optuna.distributions.FloatDistribution(0.1, 1.0)
    ref = prepare_study("s", url, tmp_path)
    study = optuna.create_study(study_name="s", storage=ref.open_storage(), direction="maximize")
    study.enqueue_trial({"lr": 0.5}, user_attrs={"enqueued": True})
    study.add_trial(optuna.trial.create_trial(params={"lr": 0.2}, distributions={"lr": lr},
                                              value=0.4, user_attrs={"warm_start_from": "x"}))
    assert prepare_study("s", url, tmp_path) == ref
    assert not ref.exists()  # replaced: the new search creates it afresh
    study = optuna.create_study(study_name="s", storage=ref.open_storage(), direction="maximize")
    study.enqueue_trial({"lr": 0.5}, user_attrs={"enqueued": True})
    study.ask()  # the enqueued trial ran: RUNNING, the search's own
    with pytest.raises(UserError, match="already holds a study named 's'"):
        prepare_study("s", url, tmp_path)


def test_warm_start_adds_the_completed_trials_of_a_compatible_search(tmp_path):
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    path = earlier / "space.yaml"
    path.write_text("fixed: {epochs: 1, warmup_epochs: 0}\narch:\n  form: [eq3, eq4]\n"
                    "recipe:\n  lr: {loguniform: [0.01, 1.0]}\n")
    store_space(load_space(path), earlier)
    study = optuna.create_study(study_name="e", storage=prepare_study(
        "e", None, earlier).open_storage(), direction="maximize")
    for form, lr, value in (("eq3", 0.1, 0.5), ("eq4", 0.5, 0.6), ("eq4", 0.9, None)):
        t = study.ask({"form": optuna.distributions.CategoricalDistribution(["eq3", "eq4"]),
                       "lr": optuna.distributions.FloatDistribution(0.01, 1.0, log=True)})
        t.set_user_attr("params_m", 2.0)
        t.set_user_attr("tune_trial_id", f"x{form}{lr}")
        study.tell(t, value, state=State.COMPLETE if value else State.PRUNED)
    new = tmp_path / "space.yaml"
    new.write_text("fixed: {epochs: 2, warmup_epochs: 0}\narch:\n  form: [eq3, eq4, eq5]\n"
                   f"recipe:\n  lr: {{loguniform: [0.01, 2.0]}}\nsearch:\n  warm_start: "
                   f"[{earlier}]\nconstraints:\n  params_m: {{max: 3}}\n")
    trials = warm_start_trials(load_space(new))
    assert sorted(t.value for t in trials) == [0.5, 0.6]  # completed ones only
    assert all(t.constraints == {"params_m": -1.0} for t in trials)
    assert all("tune_trial_id" not in t.user_attrs for t in trials)
    study = optuna.create_study(direction="maximize")
    study.add_trials(trials)  # valid trials of the new space
    assert len(study.get_trials(states=(State.COMPLETE,))) == 2
    new.write_text("fixed: {epochs: 2, warmup_epochs: 0}\narch:\n  act: [relu, softball]\n"
                   f"search:\n  warm_start: [{earlier}]\n")
    with pytest.raises(UserError, match="its parameter 'form' is not sampled here"):
        warm_start_trials(load_space(new))


def test_the_report_reads_the_study_and_prints_how_to_open_it(tmp_path, capsys):
    from qlnas.cli import main

    ref = prepare_study("demo", None, tmp_path)
    searcher = searcher_on(ref, tmp_path)
    searcher.suggest("t1")
    finish(tmp_path, searcher, "t1", [0.4, 0.6])
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    [row] = [line for line in out.splitlines() if line.startswith("| t1 ")]
    assert "| #0 COMPLETE |" in row
    [snippet] = [line.split("from Python: ")[1] for line in out.splitlines()
                 if "from Python: " in line]
    study = eval(snippet, {"optuna": optuna})
    assert [t.user_attrs["tune_trial_id"] for t in study.trials] == ["t1"]


def width_space(trial):
    trial.suggest_float("w", 0.0, 2.0)


def test_constraints_in_a_two_objective_study(tmp_path):
    """imagenet100.yaml's shape (accuracy and parameters, TPE): infeasible configurations are
    PRUNED without values, the trained ones COMPLETE with both, all with constraint values."""
    from qlnas.search.space import Constraint

    ref = prepare_study("mo", None, tmp_path)
    searcher = QLOptunaSearch(
        space=width_space,
        metric=["val_top1", "params_m"], mode=["max", "min"],
        sampler=optuna.samplers.TPESampler(seed=0), max_epochs=1, study_name=ref.name,
        storage=ref.open_storage(), out=str(tmp_path),
        constraints=(Constraint("params_m", max=1.0),),
        facts_of=lambda p: ("m", None, {"params_m": p["w"], "gmacs": 0.1, "gmacs_224": 0.2}))
    for i in range(4):
        params = searcher.suggest(f"t{i}")
        assert params["w"] <= 1.0
        searcher.on_trial_complete(f"t{i}", {"epoch": 1, "val_top1": 0.5, "params_m": 0.5})
    trials = ref.load().trials
    for t in trials:
        if t.params["w"] > 1.0:
            assert t.state == State.PRUNED and t.values is None
        else:
            assert t.state == State.COMPLETE and t.values == [0.5, 0.5]
        assert t.constraints["params_m"] == pytest.approx(t.params["w"] - 1.0)
    assert sum(t.state == State.COMPLETE for t in trials) == 4
