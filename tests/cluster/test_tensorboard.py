"""`qlnas tensorboard DIR` serves every trial's scalars on a loopback port."""

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from qlnas.cli import main
from qlnas.search.tb import logdir_of
from qlnas.train.logs import TBLogger

TRIALS = ("a1b2c_00000", "a1b2c_00001")


def fake_search(out):
    """Event files written by the trials' own logger, where a search puts them:
    OUT/trials/<trial id>/run/tb/."""
    for k, trial in enumerate(TRIALS):
        tb = TBLogger(out / "trials" / trial / "run" / "tb",
                      {"model": "qlnet26n", "arch/form": "eq3", "lr": 0.2 * (k + 1)})
        for step in range(3):
            tb.scalars({"train/loss": 2.0 - step * 0.1 * (k + 1), "train/lr": 0.1}, step)
        tb.scalars({"val/top1": 40.0 + 10 * k}, 2)
        tb.close()
    (out / "leaderboard.md").write_text("| trial |\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_serves_the_scalars_of_every_trial(tmp_path):
    fake_search(tmp_path)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qlnas.cli", "tensorboard", str(tmp_path),
                             "--port", str(port), "--tb-flag", "reload_interval=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        tags, deadline = {}, time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            try:
                tags = get_json(f"http://127.0.0.1:{port}/data/plugin/scalars/tags")
            except OSError:  # not up yet (refused, reset or slow to answer)
                pass
            if len(tags) == len(TRIALS):
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.stdout.read()
        # Runs are named by trial id (the logdir is OUT/trials), each with its scalars.
        assert sorted(tags) == [f"{t}/run/tb" for t in TRIALS]
        for run in tags.values():
            assert {"train/loss", "val/top1"} <= set(run)
        loss = get_json(f"http://127.0.0.1:{port}/data/plugin/scalars/scalars"
                        f"?run={TRIALS[1]}/run/tb&tag=train/loss")
        assert [round(v, 4) for _, _, v in loss] == [2.0, 1.8, 1.6]
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert f"http://127.0.0.1:{port}/" in out


def test_logdir_is_the_trials_folder_of_a_search(tmp_path):
    (tmp_path / "trials").mkdir()
    assert logdir_of(tmp_path) == tmp_path / "trials"
    run = tmp_path / "trials"
    assert logdir_of(run) == run  # a training run's folder is served as is


def test_missing_folder_is_a_user_error(tmp_path, capsys):
    assert main(["tensorboard", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
