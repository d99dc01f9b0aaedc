"""Searches on a real local Ray with real Optuna studies, 2 gloo DDP workers per trial."""

import csv
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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

SPACE = "# test-only space: a 2x2 grid, where lr 1e4 diverges at once\n" \
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


def search(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "qlnas.cli", "search", "--address", "local",
                           *args],
                          capture_output=True, text=True, timeout=timeout)


def trials(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "trials").glob("*/trial.json"))]


def test_search_with_a_diverging_trial(tmp_path):
    space = write_space(tmp_path, epochs=2, forms="[eq3, glb]", lrs="[0.2, 10000.0]", trials=4)
    out = tmp_path / "out"
    proc = search("--space", str(space), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = trials(out)
    assert len(records) == 4
    by_lr = {}
    for r in records:
        by_lr.setdefault(r["params"]["lr"], []).append(r)
    assert {r["status"] for r in by_lr[0.2]} == {"completed"}
    assert {r["status"] for r in by_lr[10000.0]} == {"diverged"}
    for r in by_lr[10000.0]:  # stopped at its first non-finite step: no epoch finished
        result = json.loads((out / "trials" / r["trial_id"] / "run" / "result.json").read_text())
        assert result["epochs_run"] == 0 and result["nan_events"] == 1
    for r in by_lr[0.2]:
        assert r["spec"]["form"] in ("eq3", "glb") and r["spec"]["act"] == "softball"
    # The leaderboard and the plot list every trial.
    with open(out / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["trial"] for r in rows} == {r["trial_id"] for r in records}
    assert (out / "pareto.png").stat().st_size > 10_000
    assert "diverged" in (out / "leaderboard.md").read_text()
    assert "qlnas train --config" in (out / "best_config.yaml").read_text()
    # A stopped trial frees its workers: the next trial starts within a minute.
    ordered = sorted(records, key=lambda r: r["started"])
    for prev, nxt in zip(ordered, ordered[1:], strict=False):
        if prev["status"] == "diverged":
            assert nxt["started"] - prev["ended"] < 60
    # Every trial's TensorBoard logs live under the search folder.
    assert len(list(out.glob("trials/*/run/tb/events.out.tfevents.*"))) == 4
    # qlnas report works at any time, without Ray.
    rep = subprocess.run([sys.executable, "-m", "qlnas.cli", "report", str(out), "--format",
                          "json"], capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0 and len(json.loads(rep.stdout)) == 4


def test_killed_driver_resumes_the_study(tmp_path):
    space = write_space(tmp_path, epochs=2, forms="[eq3, eq4, eq6]", lrs="[0.2]", trials=3)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "qlnas.cli", "search", "--address", "local", "--space",
           str(space), "--out", str(out)]
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    first = None
    while time.time() < deadline and driver.poll() is None:
        recs = trials(out) if (out / "trials").is_dir() else []
        done = [r for r in recs if r["status"] == "completed"]
        running = [r for r in recs if r["status"] == "running"]
        if done and running and list((out / "trials" / running[0]["trial_id"] / "run"
                                      / "checkpoints").glob("last.pt")):
            first = done[0]
            break
        time.sleep(1)
    assert first is not None, "the search did not get to a second trial"
    time.sleep(3)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    finished_metrics = (out / "trials" / first["trial_id"] / "run" / "metrics.csv").read_text()
    subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=120,
                   env=dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"))
    proc = search("--space", str(space), "--out", str(out), "--resume")
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = trials(out)
    assert len(records) == 3 and {r["status"] for r in records} == {"completed"}
    again = next(r for r in records if r["trial_id"] == first["trial_id"])
    assert again["started"] == first["started"] and again["ended"] == first["ended"]
    assert (out / "trials" / first["trial_id"] / "run" / "metrics.csv").read_text() \
        == finished_metrics
    assert sorted(r["params"]["form"] for r in records) == ["eq3", "eq4", "eq6"]


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
    [path] = (out / "tune").glob("searcher-state-*.pkl")
    with path.open("rb") as f:
        state = pickle.load(f)
    assert {t.state.name for t in state["_ot_study"].trials} == {"FAIL"}
