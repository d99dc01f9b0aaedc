"""Concurrency that follows the cluster: on the shipped cluster file, and on Ray's fake
multi-node autoscaling cluster (real raylets started by Ray's `fake_multinode` provider)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qlnas.search.cluster import NodeType, bundle_of, node_types_from_config, trials_that_fit
from qlnas.search.space import load_space
from tests.search.test_search import FIXED

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_the_shipped_cluster_runs_two_imagenet100_trials_at_once():
    """cluster/config.yaml at its largest (the head and two 8-GPU workers) holds two trials of
    search_spaces/imagenet100.yaml (8 workers of 1 GPU, 8 CPUs): the search runs two at once."""
    config = yaml.safe_load((ROOT / "cluster" / "config.yaml").read_text())
    types = node_types_from_config(config)
    assert [(t.name, t.count) for t in types] == [("gpu8", 2)]
    head = NodeType("head", {"CPU": 8.0}, 1)  # m6i.2xlarge, no GPU
    res = load_space(ROOT / "search_spaces" / "imagenet100.yaml").resources
    assert trials_that_fit([head, *types], bundle_of(res), res.workers_per_trial) == 2
    assert trials_that_fit([head], bundle_of(res), res.workers_per_trial) == 0


# --- Ray's fake multi-node autoscaler -------------------------------------------------------

# Head without room for a trial worker; worker nodes of 2 CPUs, none at first, at most 2. The
# provider keys are those Ray's own fake cluster example sets (no ssh, no updaters).
FAKE_CLUSTER = {
    "cluster_name": "qlnas-fake", "max_workers": 2, "upscaling_speed": 2.0,
    "idle_timeout_minutes": 1,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                 "disable_node_updaters": True, "disable_launch_config_check": True},
    "auth": {}, "docker": {}, "head_node_type": "ray.head.default",
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
        "cpu2": {"resources": {"CPU": 2, "object_store_memory": 300_000_000},
                 "node_config": {}, "min_workers": 0, "max_workers": 2},
    },
    **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                       "worker_setup_commands", "head_start_ray_commands",
                       "worker_start_ray_commands", "cluster_synced_files", "rsync_exclude",
                       "rsync_filter")},
    "file_mounts": {}, "file_mounts_sync_continuously": False,
}


def ray_cli(*args, env=None, timeout=120):
    return subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def fake_cluster(tmp_path_factory):
    """A head of 0 CPUs whose autoscaler adds up to two 2-CPU nodes; yields its GCS address."""
    config = tmp_path_factory.mktemp("fake") / "cluster.yaml"
    config.write_text(yaml.safe_dump(FAKE_CLUSTER))
    env = dict(os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1",
               RAY_AUTH_MODE="disabled",  # as a local ray.init(): no token to hand around
               PATH=f"{BIN}:{os.environ['PATH']}")
    ray_cli("stop", "--force", env=env)
    started = ray_cli("start", "--head", "--num-cpus=0", "--port=6379", "--include-dashboard=0",
                      f"--autoscaling-config={config}", env=env)
    assert started.returncode == 0, started.stderr[-3000:]
    try:
        yield f"{_ip(started.stdout + started.stderr)}:6379"
    finally:
        ray_cli("stop", "--force", env=env)


def _ip(text: str) -> str:
    import re

    found = re.search(r"--address='([\d.]+):6379'", text)
    assert found, text[-2000:]
    return found.group(1)


SPACE = "# test-only space: 2 trials that each need a whole 2-CPU worker node\n" \
    + FIXED.replace("{steps}", "25") + """\
arch:
  form: eq3
  act: softball
recipe:
  lr: [0.2, 0.3]
search:
  num_trials: 2
  searcher: grid
resources:
  workers_per_trial: 2
  cpus_per_worker: 1
  gpus_per_worker: {gpus}
"""


def search(address: str, space: Path, out: Path, timeout=900):
    return subprocess.run([sys.executable, "-m", "qlnas.cli", "search", "--address", address,
                           "--space", str(space), "--out", str(out)],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_a_trial_no_node_can_hold_is_refused(fake_cluster, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE.format(epochs=2, gpus=1))
    out = tmp_path / "out"
    proc = search(fake_cluster, space, out, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("qlnas: error")]
    assert "a trial worker needs 1 CPU, 1 GPU" in line and "cpu2: 2 CPU, 0 GPU" in line, line
    assert not out.exists()  # nothing half-written


@pytest.mark.slow
def test_trials_run_at_once_once_the_autoscaler_adds_nodes(fake_cluster, tmp_path):
    """No worker node at launch: both trials still start, their demand makes the autoscaler
    add two nodes, and they train at the same time (one trial at a time before the fix)."""
    space = tmp_path / "space.yaml"
    space.write_text(SPACE.format(epochs=3, gpus=0))
    out = tmp_path / "out"
    proc = search(fake_cluster, space, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(p.read_text()) for p in out.glob("trials/*/trial.json")]
    assert sorted(r["status"] for r in records) == ["completed", "completed"]
    # Training windows: from the run's first file (run_info.json, written as fit starts) to its
    # result.json (written as it ends).
    windows = [((out / "trials" / r["trial_id"] / "run" / "run_info.json").stat().st_mtime,
                (out / "trials" / r["trial_id"] / "run" / "result.json").stat().st_mtime)
               for r in records]
    (s1, e1), (s2, e2) = windows
    overlap = min(e1, e2) - max(s1, s2)
    assert overlap > 0, f"the trials trained one after the other: {windows}"
    # Both trials trained at once on a head without CPUs: the autoscaler added both nodes.
