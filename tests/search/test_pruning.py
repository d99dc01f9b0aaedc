"""Pruning: every pruner reports each epoch, never prunes a trial that trained all its epochs,
and stops poor trials from inside through the stop board (which a poll never waits on)."""

import json
import logging
import pickle
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from qlnas.search import pruning
from qlnas.search.pruning import PruningScheduler, make_pruner
from qlnas.search.searcher import QLOptunaSearch
from tests.search.test_search import FIXED, study_trials

State = optuna.trial.TrialState
EPOCHS = 3  # of the unit tests
# Of the searches: a stop reaches a trial some seconds after the report that decided it (Ray
# Train's 2 s report poll, Tune's loop, two polls of the board), i.e. up to 3 of these ~3 s
# epochs; 6 leave room for it before the last one.
SEARCH_EPOCHS = 6


class FakeBoard:
    """Stands in for the board actor: records the posts."""

    def __init__(self) -> None:
        self.posts: dict[str, str] = {}
        self.post = SimpleNamespace(remote=lambda tid, reason: self.posts.setdefault(tid, reason))


def make_search(pruner: str, monkeypatch) -> tuple[QLOptunaSearch, PruningScheduler, FakeBoard]:
    board = FakeBoard()
    monkeypatch.setattr(pruning.ray, "get_actor", lambda name, namespace: board)
    searcher = QLOptunaSearch(
        space=lambda t: {"lr": t.suggest_float("lr", 0.1, 1.0)}, metric="val_top1", mode="max",
        sampler=optuna.samplers.RandomSampler(seed=0),
        pruner=make_pruner(pruner, 1, 3, EPOCHS), max_epochs=EPOCHS)
    scheduler = PruningScheduler("board", searcher, ["val_top1"], ["max"], pruner,
                                 grace_epochs=1, reduction_factor=3, max_epochs=EPOCHS)
    return searcher, scheduler, board


def run_trial(searcher, scheduler, board, trial_id: str, curve: list[float]) -> None:
    """Suggest, report `curve` epoch by epoch (ending early once stopped), complete."""
    trial = SimpleNamespace(trial_id=trial_id, status="PENDING")  # as Tune adds it
    searcher.suggest(trial_id)
    scheduler.on_trial_add(None, trial)
    result = {}
    for epoch, value in enumerate(curve, 1):
        result = {"epoch": epoch, "val_top1": value, "train_loss": 1.0, "diverged": False}
        scheduler.on_trial_result(None, trial, result)
        if trial_id in board.posts:
            break
    scheduler.on_trial_complete(None, trial, result)
    searcher.on_trial_complete(trial_id, result)


def frozen(searcher, trial_id: str):
    ot = searcher._ot_trials[trial_id]
    return searcher._ot_study._storage.get_trial(ot._trial_id)


@pytest.mark.parametrize("pruner", ["none", "median", "hyperband", "asha"])
def test_a_trial_that_trains_all_its_epochs_is_complete(pruner, monkeypatch):
    searcher, scheduler, board = make_search(pruner, monkeypatch)
    # Two good trials, then one that is as good until its last epoch only falls behind
    # there (a pruner judging the last step would prune it), then a poor one.
    curves = {"a": [0.5, 0.6, 0.8], "b": [0.5, 0.7, 0.9], "c": [0.6, 0.8, 0.1],
              "d": [0.1, 0.1, 0.1]}
    for trial_id, curve in curves.items():
        run_trial(searcher, scheduler, board, trial_id, curve)
    for trial_id in "abc":
        t = frozen(searcher, trial_id)
        assert t.state == State.COMPLETE, (trial_id, board.posts)
        assert t.value == curves[trial_id][-1]  # the objective: the last epoch's value
        assert t.intermediate_values == {1: curves[trial_id][0], 2: curves[trial_id][1],
                                         3: curves[trial_id][2]}
    d = frozen(searcher, "d")
    if pruner == "none":
        assert d.state == State.COMPLETE and board.posts == {}
    else:
        assert d.state == State.PRUNED and board.posts == {"d": "pruned"}
        assert d.intermediate_values == {1: 0.1}


def test_a_trial_that_errors_after_its_stop_is_failed(monkeypatch):
    """Optuna's state follows the trial's record: errored is FAIL, even after a stop."""
    searcher, scheduler, board = make_search("median", monkeypatch)
    for trial_id in "ab":
        run_trial(searcher, scheduler, board, trial_id, [0.5, 0.6, 0.7])
    trial = SimpleNamespace(trial_id="c")
    searcher.suggest("c")
    scheduler.on_trial_result(None, trial, {"epoch": 1, "val_top1": 0.1, "train_loss": 1.0})
    assert board.posts == {"c": "pruned"}
    searcher.on_trial_complete("c", None, error=True)  # its workers crashed meanwhile
    assert frozen(searcher, "c").state == State.FAIL
    assert frozen(searcher, "c").intermediate_values == {1: 0.1}


def lr_space(trial) -> dict:
    return {"lr": trial.suggest_float("lr", 0.1, 1.0)}


def write_metrics(out: Path, trial_id: str, curve: list[float]) -> None:
    """A trial's metrics.csv as fit writes it, one row per epoch."""
    run = out / "trials" / trial_id / "run"
    run.mkdir(parents=True)
    rows = "".join(f"{e},{v},1.0\n" for e, v in enumerate(curve, 1))
    (run / "metrics.csv").write_text("epoch,val_top1,train_loss\n" + rows)


def test_a_restarted_driver_rebuilds_asha_and_keeps_the_stops(tmp_path, monkeypatch):
    """Tune checkpoints the searcher but not the scheduler: after a driver restart, ASHA's rungs
    come back from the trials' metrics.csv, and a stop decided before it holds."""
    board = FakeBoard()
    monkeypatch.setattr(pruning.ray, "get_actor", lambda name, namespace: board)

    def scheduler_for(searcher):
        return PruningScheduler("board", searcher, ["val_top1"], ["max"], "asha",
                                grace_epochs=1, reduction_factor=3, max_epochs=EPOCHS,
                                out=str(tmp_path))

    searcher = QLOptunaSearch(
        space=lr_space, metric="val_top1", mode="max",
        sampler=optuna.samplers.RandomSampler(seed=0), max_epochs=EPOCHS,
        stops=pruning.StopRecords(str(tmp_path)))
    scheduler = scheduler_for(searcher)
    curves = {"a": [0.5, 0.6, 0.8], "b": [0.6, 0.7, 0.9], "c": [0.1]}
    for trial_id, curve in curves.items():
        run_trial(searcher, scheduler, board, trial_id, curve)
        write_metrics(tmp_path, trial_id, curve)
    assert board.posts == {"c": "pruned"}
    assert json.loads((tmp_path / "trials" / "c" / "stop.json").read_text())["reason"] \
        == "pruned"
    # The restart: the searcher from its checkpoint (a pickle, whose stop records are read
    # from the files again), the scheduler as launched (empty), the trials added back.
    restored = pickle.loads(pickle.dumps(searcher))
    assert restored.stops.get("c") == "pruned"
    scheduler = scheduler_for(restored)
    for trial_id in curves:
        scheduler.on_trial_add(None, SimpleNamespace(trial_id=trial_id, status="PENDING"))
    # A new poor trial meets the rung the others left: pruned (ASHA alone would not judge it).
    board.posts.clear()
    run_trial(restored, scheduler, board, "d", [0.2, 0.2, 0.2])
    assert board.posts == {"d": "pruned"}
    assert frozen(restored, "d").state == State.PRUNED
    assert frozen(restored, "c").state == State.PRUNED


# (val_top1, params_m) of four trials, one value for every epoch: b is less accurate than a
# but smaller, c far less accurate but the smallest, d less accurate and larger than b.
TWO_OBJECTIVES = {"a": (0.8, 10.0), "b": (0.7, 8.0), "c": (0.3, 1.0), "d": (0.2, 9.0),
                  "e": (0.25, 0.5)}  # e: the least accurate but one, and the smallest


def two_objective_search(tmp_path, board_name="board"):
    searcher = QLOptunaSearch(
        space=lr_space, metric=["val_top1", "params_m"], mode=["max", "min"],
        sampler=optuna.samplers.RandomSampler(seed=0), max_epochs=EPOCHS,
        stops=pruning.StopRecords(str(tmp_path)))
    scheduler = PruningScheduler(board_name, searcher, ["val_top1", "params_m"], ["max", "min"],
                                 "asha", grace_epochs=1, reduction_factor=3, max_epochs=EPOCHS,
                                 out=str(tmp_path))
    return searcher, scheduler


def run_two_objective_trial(searcher, scheduler, board, trial_id: str) -> None:
    top1, params_m = TWO_OBJECTIVES[trial_id]
    trial = SimpleNamespace(trial_id=trial_id, status="PENDING")
    searcher.suggest(trial_id)
    scheduler.on_trial_add(None, trial)
    for epoch in range(1, EPOCHS + 1):
        result = {"epoch": epoch, "val_top1": top1, "params_m": params_m, "train_loss": 1.0}
        scheduler.on_trial_result(None, trial, result)
        if trial_id in board.posts:
            break
    scheduler.on_trial_complete(None, trial, result)
    searcher.on_trial_complete(trial_id, result)


def test_two_objective_asha_keeps_the_pareto_front(tmp_path, monkeypatch):
    """imagenet100.yaml's shape: ASHA on val_top1 alone stopped c, the smallest model, at the
    first rung (0.3 is below the rung's top third); only d, which b dominates, is stopped."""
    board = FakeBoard()
    monkeypatch.setattr(pruning.ray, "get_actor", lambda name, namespace: board)
    searcher, scheduler = two_objective_search(tmp_path)
    for trial_id in "abcd":
        run_two_objective_trial(searcher, scheduler, board, trial_id)
    assert board.posts == {"d": "pruned"}
    for trial_id in "abc":
        t = frozen(searcher, trial_id)
        assert t.state == State.COMPLETE and t.values == list(TWO_OBJECTIVES[trial_id])
    assert frozen(searcher, "d").state == State.PRUNED


def test_two_objective_asha_rebuilds_its_rungs_after_a_restart(tmp_path, monkeypatch):
    """The rungs come back from metrics.csv, with each model's params_m from its trial.json
    (metrics.csv has no params_m): d still meets the b that dominates it, and e, the
    smallest yet, continues."""
    board = FakeBoard()
    monkeypatch.setattr(pruning.ray, "get_actor", lambda name, namespace: board)
    searcher, scheduler = two_objective_search(tmp_path)
    for trial_id in "abc":
        run_two_objective_trial(searcher, scheduler, board, trial_id)
        write_metrics(tmp_path, trial_id, [TWO_OBJECTIVES[trial_id][0]] * EPOCHS)
        (tmp_path / "trials" / trial_id / "trial.json").write_text(json.dumps(
            {"trial_id": trial_id, "status": "completed",
             "params_m": TWO_OBJECTIVES[trial_id][1], "gmacs": 0.1}))
    restored = pickle.loads(pickle.dumps(searcher))
    _, scheduler = two_objective_search(tmp_path)
    scheduler.searcher = restored
    for trial_id in "abc":
        scheduler.on_trial_add(None, SimpleNamespace(trial_id=trial_id, status="TERMINATED"))
    run_two_objective_trial(restored, scheduler, board, "d")
    run_two_objective_trial(restored, scheduler, board, "e")
    assert board.posts == {"d": "pruned"}
    assert frozen(restored, "e").state == State.COMPLETE


# --- the poll of the stop board, on a real Ray --------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for this module's tests (and its searches, which join it)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_the_stop_poll_never_blocks_and_survives_a_lost_board(local_ray, caplog):
    ray = local_ray

    @ray.remote(num_cpus=0)
    class SlowBoard:  # a board behind a slow GCS: every answer takes 3 s
        def __init__(self):
            self.reasons = {}

        def post(self, trial_id, reason):
            self.reasons[trial_id] = reason

        def reason(self, trial_id):
            time.sleep(3)
            return self.reasons.get(trial_id)

    board = SlowBoard.options(name="slow", namespace=pruning.NAMESPACE).remote()
    ray.get(board.post.remote("other", "pruned"))
    poll = pruning.stop_poller("slow", "t1")
    calls = []
    deadline = time.time() + 20
    while time.time() < deadline:
        t0 = time.perf_counter()
        answer = poll()
        calls.append(time.perf_counter() - t0)
        if len(calls) == 20:
            ray.get(board.post.remote("t1", "pruned"))
        if answer:
            break
        time.sleep(0.1)
    assert max(calls) < 0.5, f"a poll waited {max(calls):.2f} s"
    assert answer, "the posted stop never reached the poll"
    # The last epoch reported: the trial is completed, whatever was posted.
    poll.finished = True
    assert poll() is False
    poll.finished = False
    # A lost board: logged once, the trial keeps its last decision (here: stop).
    poll2 = pruning.stop_poller("slow", "t1")
    ray.kill(board)
    with caplog.at_level(logging.WARNING, logger="qlnas.search.pruning"):
        answers = []
        for _ in range(30):
            answers.append(poll2())
            time.sleep(0.2)
        assert answers[-1] is False  # it never got an answer: it keeps "continue"
    lost = [r for r in caplog.records if "stop board lost" in r.getMessage()]
    assert len(lost) == 1
    assert poll() is True  # the first poller keeps its "stop"


# --- searches where a pruner stops a trial through the board ------------------------------

SPACE = "# test-only space: lr 1e-5 learns nothing in 6 short epochs, so every pruner " \
    "stops it\n" + FIXED.replace("{steps}", "20") + """\
arch:
  form: eq3
  act: softball
recipe:
  lr: {lrs}
search:
  num_trials: {trials}
  searcher: grid
  seed: 3
  study_name: pruning   # Hyperband's brackets follow it: see test_hyperband_brackets_...
pruning:
  pruner: {pruner}
  grace_epochs: 1
  reduction_factor: 3
resources:
  workers_per_trial: 2
  cpus_per_worker: 1
"""


def search(address: str, *args, timeout=900):
    return subprocess.run([sys.executable, "-m", "qlnas.cli", "search", "--address", address,
                           *args], capture_output=True, text=True, timeout=timeout)


def records(out: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in (out / "trials").glob("*/trial.json")),
                  key=lambda r: r["started"])


@pytest.mark.parametrize("name,bracket_ids", [("pruning", {0}), ("space", {0, 1})])
def test_hyperband_brackets_follow_the_study_name(name, bracket_ids):
    """Optuna's Hyperband puts each trial in a bracket by a hash of the study's name and the
    trial's number, and compares trials only within one. Under "pruning" a search's first three
    trials share a bracket, so a poor third one meets the other two; under "space" (a space
    file's name, the default) the third is alone in the second bracket and trains all its
    epochs. (The searches below run the shipped spaces' pruners, median and ASHA, through the
    same stop path; Hyperband's decisions are the unit tests' above.)"""
    hb = make_pruner("hyperband", 1, 3, SEARCH_EPOCHS)
    study = optuna.create_study(study_name=name, direction="maximize", pruner=hb)
    for _ in range(3):
        study.ask()
    hb._try_initialization(study)
    assert {hb._get_bracket_id(study, t) for t in study.trials} == bracket_ids


@pytest.mark.slow
@pytest.mark.parametrize("pruner,lrs,order", [
    # The median pruner judges from its third trial on (n_startup_trials=2); ASHA from its
    # second, at its first rung.
    ("median", "[0.3, 0.2, 1.0e-05]", [0.2, 0.3, 1e-05]),
    ("asha", "[1.0e-05, 0.2]", [0.2, 1e-05]),
])
def test_a_pruner_stops_a_poor_trial_from_inside(pruner, lrs, order, tmp_path, local_ray):
    """The shipped spaces' pruners (demo: median, imagenet100: ASHA): the poor trial is pruned
    from inside (before its last epoch, its workers freed), the first one trains all its
    epochs."""
    space = tmp_path / "space.yaml"
    space.write_text(SPACE.format(pruner=pruner, epochs=SEARCH_EPOCHS, lrs=lrs,
                                  trials=len(order)))
    out = tmp_path / "out"
    address = local_ray.get_runtime_context().gcs_address
    proc = search(address, "--space", str(space), "--out", str(out))
    finished = time.time()
    assert proc.returncode == 0, proc.stderr[-4000:]
    recs = records(out)
    assert [r["params"]["lr"] for r in recs] == order, "grid order changed"
    status = {r["params"]["lr"]: r["status"] for r in recs}
    assert status[0.2] == "completed" and status[1e-05] == "pruned", status
    optuna_trials = study_trials(out)
    rows = json.loads(subprocess.run([sys.executable, "-m", "qlnas.cli", "report", str(out),
                                      "--format", "json"], capture_output=True, text=True,
                                     timeout=120).stdout)
    board = {row["trial"]: row for row in rows}
    for r in recs:
        run = out / "trials" / r["trial_id"] / "run"
        result = json.loads((run / "result.json").read_text())
        ot = optuna_trials[r["trial_id"]]
        reported = result["epochs_run"]
        # Every epoch's objective is in the study, whatever the pruner, and the leaderboard
        # shows the same value as Optuna's: the last epoch's.
        assert sorted(ot.intermediate_values) == list(range(1, reported + 1)), r["status"]
        assert board[r["trial_id"]]["val_top1"] == round(ot.intermediate_values[reported], 4)
        assert r["attempts"] == 1 and board[r["trial_id"]]["error"] == ""  # a full record
        if r["status"] == "completed":
            assert reported == SEARCH_EPOCHS and (run / "model.pt").is_file()
            assert ot.state == State.COMPLETE
            assert ot.value == pytest.approx(ot.intermediate_values[SEARCH_EPOCHS])
        else:
            # Stopped from inside, before its last epoch; its trainer ended and freed its
            # workers, so the search went on (or ended) at once.
            assert r["status"] == "pruned" and reported < SEARCH_EPOCHS
            assert not (run / "model.pt").exists()
            assert ot.state == State.PRUNED
            later = [n for n in recs if n["started"] > r["started"]]
            assert (later[0]["started"] if later else finished) - r["ended"] < 60
    # best_config.yaml is the leaderboard's first row, the best by that value.
    best = max((r for r in recs if r["status"] == "completed"),
               key=lambda r: optuna_trials[r["trial_id"]].value)
    assert rows[0]["trial"] == best["trial_id"]
    assert f"Best trial {best['trial_id']}" in (out / "best_config.yaml").read_text()
