"""`qlnas train` on a damaged `.beton`: one clear line and exit 2 (in one process and in two),
or with --skip-corrupt a finished run that counts what it left out."""

import json
import time

import pytest
import torch

from qlnas.data import demo_dataset
from qlnas.data.integrity import verify
from tests.data.damage import damaged_copy
from tests.train.helpers import metrics, qlnas_train, tb_scalars

pytestmark = pytest.mark.slow

ARGS = ["--epochs", "2", "--max-steps-per-epoch", "4", "--warmup-epochs", "0.25",
        "--workers", "1"]


@pytest.fixture(scope="module")
def demo():
    return demo_dataset()


def error_lines(proc) -> list[str]:
    text = proc.stderr.replace("\r", "\n")
    return [line[line.index("qlnas: error:"):] for line in text.splitlines()
            if "qlnas: error:" in line]


@pytest.mark.parametrize(("where", "nproc"), [("header", 1), ("end", 2), ("truncated", 2)])
def test_a_damaged_file_stops_before_any_process_starts(demo, tmp_path, where, nproc):
    bad = damaged_copy(demo[0], tmp_path / "train.beton", where)
    out = tmp_path / "run"
    proc = qlnas_train(out, "--train", str(bad), "--val", str(demo[1]), *ARGS, nproc=nproc)
    assert proc.returncode == 2, proc.stderr[-2000:]
    [line] = error_lines(proc)
    assert line.startswith(f"qlnas: error: {bad}: damaged or not an FFCV file")
    assert "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("nproc", [1, 2])
def test_damaged_samples_stop_the_run_naming_them(demo, tmp_path, nproc):
    bad = damaged_copy(demo[0], tmp_path / "train.beton", "middle")
    start = time.time()
    proc = qlnas_train(tmp_path / "run", "--train", str(bad), "--val", str(demo[1]), *ARGS,
                       nproc=nproc)
    took = time.time() - start
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = error_lines(proc)
    assert lines and all(f"{bad}: sample " in line and "failed to decode" in line
                         and "--skip-corrupt" in line for line in lines), lines
    assert "terminate called" not in proc.stderr
    print(f"{nproc} process(es): stopped after {took:.0f} s")


def test_skip_corrupt_trains_without_them_and_counts_them(demo, tmp_path):
    bad = damaged_copy(demo[0], tmp_path / "train.beton", "middle")
    out = tmp_path / "run"
    # With mixup, which pairs samples: a batch left odd by a damaged sample used to stop the
    # run (and every retry) in timm's even-batch assert.
    proc = qlnas_train(out, "--train", str(bad), "--val", str(demo[1]), *ARGS, "--skip-corrupt",
                       "--mixup", "0.8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "completed"
    state = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    skipped = state["state"]["skipped_samples"]
    assert skipped and {split for split, _ in skipped} == {"train"}
    assert {i for _, i in skipped} <= set(verify(bad, progress=False)["image"])
    assert result["skipped_samples"] == len(skipped)
    assert int(metrics(out)[-1]["skipped_samples"]) == len(skipped)
    curve = [e.value for e in tb_scalars(out).Scalars("data/skipped_samples")]
    assert len(curve) == 2 and curve[-1] == len(skipped) and curve[0] <= curve[1]
    assert "left out sample" in proc.stderr
