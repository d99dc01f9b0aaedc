"""`qlnas dashboard`: the real optuna-dashboard server over a search's study (journal file and
SQLite), queried through its HTTP API and rendered in headless Chromium."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from PIL import Image

from qlnas.cli import main

# A search's trials as the search records them: state, and the user attrs it sets.
TRIALS = [
    ("t0", "completed", optuna.trial.TrialState.COMPLETE, [0.31, 0.52]),
    ("t1", "completed", optuna.trial.TrialState.COMPLETE, [0.35, 0.61]),
    ("t2", "pruned", optuna.trial.TrialState.PRUNED, [0.12]),
    ("t3", "diverged", optuna.trial.TrialState.FAIL, [0.1]),
    ("t4", "errored", optuna.trial.TrialState.FAIL, []),
]
STATES = ["Complete", "Complete", "Pruned", "Fail", "Fail"]


def _make_search(folder: Path, name: str, storage: str, storage_obj) -> None:
    """A search folder with `study.json` and a study of TRIALS in `storage_obj`."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name=name, storage=storage_obj, direction="maximize")
    lr = optuna.distributions.FloatDistribution(1e-4, 1.0, log=True)
    for i, (tune_id, status, state, curve) in enumerate(TRIALS):
        attrs = {"tune_trial_id": tune_id, "status": status, "params_m": 1.5 + i,
                 "gmacs": 0.2 + i / 10, "curve": curve, "spec": {"form": "eq3"}}
        study.add_trial(optuna.trial.create_trial(
            params={"lr": 0.01 * (i + 1)}, distributions={"lr": lr}, state=state,
            values=[curve[-1]] if state == optuna.trial.TrialState.COMPLETE else None,
            intermediate_values=dict(enumerate(curve, 1)), user_attrs=attrs))
    (folder / "study.json").write_text(json.dumps({"study_name": name, "storage": storage}))


def _journal_search(folder: Path) -> Path:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal = str(folder / "optuna.journal")
    folder.mkdir(parents=True)
    _make_search(folder, "search-journal", journal, JournalStorage(JournalFileBackend(journal)))
    return folder


def _sqlite_search(folder: Path) -> Path:
    url = f"sqlite:///{folder.resolve() / 'study.db'}"
    folder.mkdir(parents=True)
    _make_search(folder, "search-sqlite", url, optuna.storages.RDBStorage(url))
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


class Server:
    """`qlnas dashboard DIR` in a subprocess, ready once its HTTP API answers."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qlnas.cli", "dashboard", str(folder), "--port", str(self.port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120  # `import qlnas` (torch, timm) is most of it
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"dashboard exited {self.proc.returncode}: "
                                     f"{self.proc.stdout.read()}")
            try:
                _get(self.url + "/api/meta")
                return
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"dashboard did not answer within 120 s: {self.stop()[1]}")

    def stop(self) -> tuple[int, str]:
        """Ctrl-C, as a user stops it; its exit code and output."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            out, _ = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return self.proc.returncode, out


@pytest.fixture(scope="module")
def journal_server(tmp_path_factory):
    server = Server(_journal_search(tmp_path_factory.mktemp("dash") / "search"))
    yield server
    server.stop()


def _check_api(server: Server, name: str) -> int:
    studies = _get(server.url + "/api/studies")["study_summaries"]
    assert [s["study_name"] for s in studies] == [name]
    assert studies[0]["directions"] == ["maximize"]
    detail = _get(f"{server.url}/api/studies/{studies[0]['study_id']}")
    trials = sorted(detail["trials"], key=lambda t: t["number"])
    assert detail["name"] == name and len(trials) == len(TRIALS)
    assert [t["state"] for t in trials] == STATES
    attrs = [{a["key"]: a["value"] for a in t["user_attrs"]} for t in trials]
    assert [a["tune_trial_id"] for a in attrs] == [t[0] for t in TRIALS]
    assert [a["status"] for a in attrs] == [t[1] for t in TRIALS]
    assert json.loads(attrs[1]["curve"]) == [0.35, 0.61]
    assert [v["value"] for v in trials[1]["intermediate_values"]] == [0.35, 0.61]
    assert trials[1]["values"] == [0.61]
    return studies[0]["study_id"]


def test_dashboard_serves_the_journal_study(journal_server):
    _check_api(journal_server, "search-journal")


def test_dashboard_serves_an_sqlite_study_and_stops_on_ctrl_c(tmp_path):
    server = Server(_sqlite_search(tmp_path / "search"))
    try:
        study_id = _check_api(server, "search-sqlite")
    finally:
        code, out = server.stop()
    assert code == 0, out
    assert f"127.0.0.1:{server.port}/dashboard/studies/{study_id}" in out
    assert f"ssh -L {server.port}:localhost:{server.port}" in out


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)


@pytest.mark.skipif(_chromium() is None,
                    reason="no chromium on PATH (apt-get install chromium; make test does)")
def test_dashboard_page_renders_in_headless_chromium(journal_server, tmp_path):
    study_id = _get(journal_server.url + "/api/studies")["study_summaries"][0]["study_id"]
    page = f"{journal_server.url}/dashboard/studies/{study_id}"
    shot = tmp_path / "dashboard.png"
    browser = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
               "--window-size=1280,900", "--virtual-time-budget=15000",
               f"--user-data-dir={tmp_path / 'profile'}"]
    env = {**os.environ, "HOME": str(tmp_path)}  # chromium writes its caches there
    subprocess.run([*browser, f"--screenshot={shot}", page], env=env, check=True,
                   capture_output=True, timeout=60)
    dom = subprocess.run([*browser, "--dump-dom", page], env=env, check=True,
                         capture_output=True, text=True, timeout=60).stdout
    print(f"dashboard screenshot: {shot}")
    assert "search-journal" in dom and "History" in dom  # the app rendered the study
    with Image.open(shot) as image:
        assert image.format == "PNG" and image.size == (1280, 900)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 100, f"{shot} looks blank: {len(colours)} colours"
    assert max(n for n, _ in colours) < 0.9 * 1280 * 900, f"{shot}: one colour fills it"


def test_bad_folder_study_json_and_port_are_one_line_errors(tmp_path, capsys, journal_server):
    (tmp_path / "old").mkdir()
    gone = tmp_path / "gone"
    gone.mkdir()
    (gone / "study.json").write_text(json.dumps({"study_name": "x",
                                                 "storage": str(gone / "missing.journal")}))
    nodb = tmp_path / "nodb"
    nodb.mkdir()
    (nodb / "study.json").write_text(json.dumps({"study_name": "x",
                                                 "storage": f"sqlite:///{nodb / 'gone.db'}"}))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "study.json").write_text("{not json")
    cases = [
        ([str(tmp_path / "nope")], "no such folder"),
        ([str(tmp_path / "old")], "no study.json"),
        ([str(gone)], "missing.journal: no such file"),
        ([str(nodb)], "gone.db: no such file"),
        ([str(broken)], "study.json: unreadable (JSONDecodeError"),
        ([str(tmp_path / "old"), "--port", "70000"], "--port 70000: expected 1-65535"),
    ]
    for argv, message in cases:
        assert main(["dashboard", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    # the port of a running dashboard is taken: one line, not a traceback
    assert main(["dashboard", str(journal_server.folder), "--port",
                 str(journal_server.port)]) == 2
    err = capsys.readouterr().err
    assert f"--port {journal_server.port}: cannot listen there" in err
    assert len(err.strip().splitlines()) == 1, err
