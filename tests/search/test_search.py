"""Searches on a real local Ray with real Optuna studies, 2 gloo DDP workers per trial."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlnas.search.report import read_history

pytestmark = pytest.mark.slow

# The fixed settings of the test spaces: qlnet26n on the embedded digits, short epochs.
FIXED = """\
fixed:
  model: qlnet26n
  epochs: {epochs}
  batch_size: 64
  resolution: 32
  warmup_epochs: 0
  workers: 1
  max_steps_per_epoch: {steps}
  crop_scale_min: 0.35
  hflip: false
"""

SPACE = "# test-only space: a grid where lr 1e4 diverges at once\n" \
    + FIXED.replace("{steps}", "6") + """\
arch:
  form: {forms}
  act: softball
recipe:
  lr: {lrs}
search:
  num_trials: {trials}
  searcher: grid
pruning:
  pruner: median
resources:
  workers_per_trial: 2
  cpus_per_worker: 1
"""


def write_space(tmp_path, **kw):
    path = tmp_path / "space.yaml"
    path.write_text(SPACE.format(**kw))
    return path


def search(*args, timeout=900, env=None):
    return subprocess.run([sys.executable, "-m", "qlnas.cli", "search", "--address", "local",
                           *args],
                          capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})


def trials(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "trials").glob("*/trial.json"))]


def test_search_with_a_diverging_trial(tmp_path):
    # The grid's order: lr 1e4 first, so the next trial's start after a stop is measured.
    space = write_space(tmp_path, epochs=2, forms="[glb]", lrs="[0.2, 10000.0]", trials=2)
    # val_loss: an objective the diverged event lacked, and Tune's strict metric check then
    # ended the whole search.
    space.write_text(space.read_text().replace("  searcher: grid\n", "  searcher: grid\n"
                                               "  objectives: [{metric: val_loss, mode: min}]\n"))
    out = tmp_path / "out"
    proc = search("--space", str(space), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = trials(out)
    assert len(records) == 2
    by_lr = {}
    for r in records:
        by_lr.setdefault(r["params"]["lr"], []).append(r)
    assert {r["status"] for r in by_lr[0.2]} == {"completed"}
    assert {r["status"] for r in by_lr[10000.0]} == {"diverged"}
    for r in by_lr[10000.0]:  # stopped at its first non-finite step: no epoch finished
        result = json.loads((out / "trials" / r["trial_id"] / "run" / "result.json").read_text())
        assert result["epochs_run"] == 0 and result["nan_events"] == 1
    for r in by_lr[0.2]:
        assert r["spec"]["form"] == "glb" and r["spec"]["act"] == "softball"
    # The leaderboard and the plot list every trial.
    with open(out / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["trial"] for r in rows} == {r["trial_id"] for r in records}
    assert (out / "pareto.png").stat().st_size > 10_000
    assert "diverged" in (out / "leaderboard.md").read_text()
    assert "qlnas train --config" in (out / "best_config.yaml").read_text()
    # A stopped trial frees its workers: the next trial starts within a minute.
    first, second = sorted(records, key=lambda r: r["started"])
    assert first["status"] == "diverged", "grid order changed"
    assert second["started"] - first["ended"] < 60
    # Every trial's TensorBoard logs live under the search folder.
    assert len(list(out.glob("trials/*/run/tb/events.out.tfevents.*"))) == 2
    # qlnas report works at any time, without Ray.
    rep = subprocess.run([sys.executable, "-m", "qlnas.cli", "report", str(out), "--format",
                          "json"], capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0 and len(json.loads(rep.stdout)) == 2


RESUMED = "# test-only space: ASHA prunes lr 1e-5 (and maybe others) at its rungs\n" \
    + FIXED.replace("{steps}", "12") + """\
arch:
  form: eq3
  act: softball
recipe:
  lr: [0.3, 0.2, 1.0e-05, 0.25]
search:
  num_trials: {trials}
  searcher: grid
  seed: 5
pruning:
  pruner: asha
  grace_epochs: 1
resources:
  workers_per_trial: 2
  cpus_per_worker: 1
"""


def load_study(out: Path):
    """The search's study, opened as a notebook would (`optuna.load_study` with what
    study.json records)."""
    import optuna

    ref = json.loads((out / "study.json").read_text())
    storage = ref["storage"]
    if "://" not in storage:
        storage = optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(storage))
    return optuna.load_study(study_name=ref["study_name"], storage=storage)


def study_trials(out: Path) -> dict:
    """Tune trial id -> Optuna trial. Asserts the study holds each Tune trial once and no
    trial without one (none lost, none duplicated), leaving out the infeasible and those told
    FAIL that a resume ran again (another trial's retry_of)."""
    study = load_study(out)
    retried = {t.user_attrs.get("retry_of") for t in study.trials}
    kept = [t for t in study.trials
            if t.user_attrs.get("status") != "infeasible" and t.number not in retried]
    ids = [t.user_attrs.get("tune_trial_id") for t in kept]
    assert None not in ids and len(ids) == len(set(ids)), ids
    return {t.user_attrs["tune_trial_id"]: t for t in kept}


def study_states(out: Path) -> dict:
    """Tune trial id -> (Optuna state, intermediate values)."""
    return {tid: (t.state.name, t.intermediate_values) for tid, t in study_trials(out).items()}


def test_a_killed_driver_resumes_with_its_stops_and_a_bigger_budget(tmp_path):
    """Killed as ASHA stops a trial: after --resume that trial stays stopped (never trained
    again, PRUNED in Optuna), the finished trials are untouched, and the budget grows."""
    space = tmp_path / "space.yaml"
    space.write_text(RESUMED.format(epochs=6, trials=3))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "qlnas.cli", "search", "--address", "local", "--space",
           str(space), "--out", str(out)]
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and driver.poll() is None \
            and not list(out.glob("trials/*/stop.json")):
        time.sleep(0.5)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    stops = list(out.glob("trials/*/stop.json"))
    assert len(stops) == 1, "no trial was stopped before the kill"
    stop = stops[0]
    subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=120,
                   env=dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"))
    stopped = stop.parent.name
    before = {r["trial_id"]: r for r in trials(out)}
    # Which trial ASHA stops first depends on the machine's numerics (lr 0.2 and 0.3 are a
    # few samples apart at the rungs); the stop only has to be the one the kill caught.
    assert before[stopped]["status"] in ("running", "pruned")
    finished = {t: r["status"] for t, r in before.items()
                if r["status"] in ("completed", "pruned") and t != stopped}
    metrics = {t: (out / "trials" / t / "run" / "metrics.csv").read_text() for t in before
               if (out / "trials" / t / "run" / "metrics.csv").is_file()}
    # The budget grows by one: resumed from the search's own copy of its space.
    proc = search("--out", str(out), "--resume", "--add-trials", "1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = {r["trial_id"]: r for r in trials(out)}
    assert sorted(r["params"]["lr"] for r in records.values()) == [1e-05, 0.2, 0.25, 0.3]
    assert records[stopped]["status"] == "pruned"  # stopped for good, never trained again
    assert {t: records[t]["status"] for t in finished} == finished
    status = {r["params"]["lr"]: r["status"] for r in records.values()}
    # The rest meet ASHA's rungs as the earlier trials left them: any may be pruned, and
    # lr 1e-5 (which learns nothing in 72 steps) always is.
    assert set(status.values()) <= {"completed", "pruned"}, status
    assert status[1e-05] == "pruned" and "completed" in status.values(), status
    for trial_id, text in metrics.items():  # no epoch trained again, none lost
        if before[trial_id]["status"] != "running" or trial_id == stopped:
            assert (out / "trials" / trial_id / "run" / "metrics.csv").read_text() == text
    states = study_states(out)
    told = {"completed": "COMPLETE", "pruned": "PRUNED"}
    assert {t: s for t, (s, _) in states.items()} == {t: told[r["status"]]
                                                      for t, r in records.items()}
    for trial_id, (_, curve) in states.items():  # every epoch in the study, the replayed too
        epochs = (out / "trials" / trial_id / "run" / "metrics.csv").read_text().count("\n") - 1
        assert sorted(curve) == list(range(1, epochs + 1)), trial_id


DUPLICATES = "# test-only space: act none makes act_at moot, so the grid's 2 points are 1 " \
    "configuration\n" + FIXED.replace("{steps}", "6") + """\
arch:
  form: eq3
  act: [none]
  act_at: [ds, all]
search:
  num_trials: 2
  searcher: grid
resources:
  workers_per_trial: 2
  cpus_per_worker: 1
"""


def test_an_identical_configuration_is_trained_once(tmp_path):
    """The second point of the grid is the first configuration again: its result is reused
    (marked so on the leaderboard; Optuna told the same value), nothing trained twice; the
    GMACs are counted at the trial's resolution, and at 224 px beside them."""
    from qlnas.models.complexity import count_macs
    from qlnas.train.config import TrainConfig
    from qlnas.train.fit import validate

    space = tmp_path / "space.yaml"
    space.write_text(DUPLICATES.format(epochs=2))
    out = tmp_path / "out"
    proc = search("--space", str(space), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    first, second = sorted(trials(out), key=lambda r: r["started"])
    assert {first["status"], second["status"]} == {"completed"}
    assert second["reused_from"] == first["trial_id"] and "reused_from" not in first
    assert not (out / "trials" / second["trial_id"] / "run").exists()  # nothing trained
    with open(out / "leaderboard.csv") as f:
        rows = {r["trial"]: r for r in csv.DictReader(f)}
    assert rows[second["trial_id"]]["reused_from"] == first["trial_id"]
    assert rows[second["trial_id"]]["val_top1"] == rows[first["trial_id"]]["val_top1"] != ""
    states = study_states(out)
    assert states[second["trial_id"]] == states[first["trial_id"]]
    assert states[first["trial_id"]][0] == "COMPLETE"
    *_, model = validate(TrainConfig.from_dict(first["train_config"]), 2)
    assert first["gmacs"] == count_macs(model, 32) / 1e9 < first["gmacs_224"]
    assert first["gmacs_224"] == count_macs(model, 224) / 1e9


ERRORING = """\
# test-only space: no batch size splits over the 2 workers, so every trial errors
fixed:
  model: qlnet26n
  epochs: 1
  resolution: 32
  warmup_epochs: 0
  workers: 1
  max_steps_per_epoch: 2
arch:
  form: eq3
  act: softball
recipe:
  batch_size: [63, 65]
search:
  num_trials: 2
  searcher: grid
resources:
  workers_per_trial: 2
  cpus_per_worker: 1
  trial_retries: 1
"""


def test_a_search_whose_trials_all_error_fails_and_lists_them(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(ERRORING)
    out = tmp_path / "out"
    proc = search("--space", str(space), "--out", str(out), timeout=600)
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "no trial completed (2 trials: 2 errored)" in proc.stderr
    records = trials(out)  # each failed before its model was built, and still left a record
    assert sorted(r["params"]["batch_size"] for r in records) == [63, 65]
    for r in records:
        assert r["status"] == "errored" and r["attempts"] == 2  # trial_retries: 1
        assert r["error"] == f"batch_size={r['params']['batch_size']} is not divisible by " \
            "the 2 processes"
    with open(out / "leaderboard.csv") as f:
        rows = {r["trial"]: r for r in csv.DictReader(f)}
    assert {t: r["error"] for t, r in rows.items()} == {r["trial_id"]: r["error"]
                                                         for r in records}
    assert not (out / "best_config.yaml").exists()
    # Optuna was told: FAIL, so no sampler learns from them as if they had a value.
    assert {t.state.name for t in study_trials(out).values()} == {"FAIL"}


DYING = """\
# test-only space: its model ends the trial's process when built, as an OOM kill would
imports: [tests.search.family]
fixed: {epochs: 1, batch_size: 32, resolution: 32, warmup_epochs: 0, workers: 1,
        max_steps_per_epoch: 2, hflip: false}
models: [crashnet]
arch:
  width: [4]
search: {num_trials: 1, searcher: grid}
resources: {workers_per_trial: 1, cpus_per_worker: 1}
"""


def test_a_trial_whose_actor_dies_is_errored_in_optuna_and_a_resume_completes_it(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(DYING)
    out = tmp_path / "out"
    proc = search("--space", str(space), "--out", str(out), timeout=600,
                  env={"QLNAS_TEST_CRASH": "1"})
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "no trial completed (1 trials: 1 errored)" in proc.stderr
    [record] = trials(out)
    assert record["status"] == "errored" and record["model"] is None and record["error"]
    # Tune tells the searcher before its callbacks: Optuna's copy of the record said running.
    [failed] = study_trials(out).values()
    assert failed.state.name == "FAIL" and failed.user_attrs["status"] == "errored"
    assert failed.user_attrs["error"] == record["error"]
    # --resume runs it again; its result reached no Optuna trial (the FAIL one cannot take it).
    proc = search("--out", str(out), "--resume", timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    [record] = trials(out)
    assert record["status"] == "completed" and record["attempts"] == 2
    [done] = study_trials(out).values()
    assert done.state.name == "COMPLETE" and done.user_attrs["retry_of"] == failed.number
    assert done.params == failed.params and done.user_attrs["status"] == "completed"
    [*_, last] = read_history(out / "trials" / record["trial_id"] / "run", typed=True)
    assert done.values == [last["val_top1"]] and last["epoch"] == 1
    assert load_study(out).trials[failed.number].state.name == "FAIL"  # as Optuna was told


PLUGGED = """\
# test-only space: a model family of its own (imports:), a sampler class, SQLite storage, an
# enqueued configuration that is infeasible and one that is not
imports: [tests.search.family]
fixed:
  epochs: 2
  batch_size: 32
  resolution: 32
  warmup_epochs: 0
  workers: 1
  max_steps_per_epoch: 3
  hflip: false
models: [tinynet]
arch:
  width: [4, 8, 64]
  depth: [1, 2]
constraints:
  params_m: {max: 0.01}   # 64 wide and 2 deep is about 0.039 M
search:
  num_trials: 3
  sampler: {class: optuna.samplers.BruteForceSampler}
  storage: sqlite:///STORE
  study_name: plugged
  enqueue: [{width: 64, depth: 2}, {width: 4, depth: 1}]
  warm_start: [EARLIER]
resources:
  workers_per_trial: 1
  cpus_per_worker: 1
"""


def test_a_plugged_in_family_sampler_and_constraint_search(tmp_path):
    """Nothing of qlnas edited: the family comes from a module the space imports (in the
    driver and in every worker), the sampler is a class named in the YAML; the enqueued
    infeasible configuration never starts a worker, and the study is in SQLite."""
    import optuna

    from qlnas.search.run import store_space
    from qlnas.search.space import load_space
    from qlnas.search.study import prepare_study

    # An earlier search of the same space that completed 8 wide, 1 deep: the new study starts
    # with it, so the brute-force sampler never trains that configuration again.
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "space.yaml").write_text(PLUGGED.replace("  warm_start: [EARLIER]\n", "")
                                        .replace("sqlite:///STORE", str(earlier / "j")))
    store_space(load_space(earlier / "space.yaml"), earlier)
    old = optuna.create_study(study_name="plugged", direction="maximize", storage=prepare_study(
        "plugged", None, earlier).open_storage())
    choices = optuna.distributions.CategoricalDistribution
    old.add_trial(optuna.trial.create_trial(
        params={"width": 8, "depth": 1, "model": "tinynet"}, value=0.5,
        distributions={"width": choices([4, 8, 64]), "depth": choices([1, 2]),
                       "model": choices(["tinynet"])},
        user_attrs={"params_m": 0.0008, "gmacs": 0.0001, "tune_trial_id": "earlier_00000"}))
    space = tmp_path / "space.yaml"
    space.write_text(PLUGGED.replace("STORE", str(tmp_path / "studies.db"))
                     .replace("EARLIER", str(earlier)))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "qlnas.cli", "search", "--address", "local",
                           "--space", str(space), "--out", str(out)],
                          capture_output=True, text=True, timeout=900,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = trials(out)
    trained = [r for r in records if r["status"] != "infeasible"]
    infeasible = [r for r in records if r["status"] == "infeasible"]
    assert len(trained) == 3 and {r["status"] for r in trained} == {"completed"}
    assert {r["model"] for r in trained} == {"tinynet"}
    assert all(r["params_m"] <= 0.01 for r in trained)
    assert {"width": 8, "depth": 1, "model": "tinynet"} not in [r["params"] for r in trained]
    big = {"width": 64, "depth": 2, "model": "tinynet"}
    assert big in [r["params"] for r in infeasible]
    for r in infeasible:  # never trained: no run, no Ray Train run
        assert r["params_m"] > 0.01 and "params_m" in r["error"]
        assert not (out / "trials" / r["trial_id"] / "run").exists()
    assert "infeasible configurations skipped before any worker started" in proc.stdout
    study = optuna.load_study(study_name="plugged",
                              storage=f"sqlite:///{tmp_path / 'studies.db'}")
    assert isinstance(study.sampler, optuna.samplers.TPESampler)  # loading does not know it
    by_number = sorted(study.trials, key=lambda t: t.number)
    assert by_number[0].params == big  # the enqueued ones come first
    assert by_number[0].state.name == "PRUNED" and by_number[0].constraints["params_m"] > 0
    assert by_number[1].params == {"width": 4, "depth": 1, "model": "tinynet"}
    assert by_number[1].state.name == "COMPLETE"
    [warm] = [t for t in study.trials if "warm_start_from" in t.user_attrs]
    assert warm.params == {"width": 8, "depth": 1, "model": "tinynet"} and warm.value == 0.5
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 3 + 1
    assert all(t.constraints["params_m"] <= 0 for t in study.trials
               if t.state.name == "COMPLETE")
    with open(out / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["status"] for r in rows) == ["completed"] * 3 + ["infeasible"] * len(
        infeasible)
