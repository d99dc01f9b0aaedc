"""`qlnas train --dry-run`: the printed plan, the LR plot, and nothing else in --out."""

from __future__ import annotations

import re
import subprocess
import sys

import matplotlib.image
import pytest

ROW = re.compile(r"^\s*(\d+|last)\s+(\d+)\s+(\S+)", re.M)


def dry_run(out, *args, timeout=600):
    cmd = [sys.executable, "-m", "qlnas.cli", "train", "--dry-run", *args, "--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def field(text: str, name: str) -> str:
    return re.search(rf"^{name}:\s+(.*)$", text, re.M).group(1)


@pytest.mark.slow  # builds the model and loaders, pays the loader JIT, times steps
def test_demo_plan(tmp_path):
    out = tmp_path / "run"
    proc = dry_run(out, "--epochs", "3", "--warmup-epochs", "0.5", "--min-lr", "0.001")
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = proc.stdout
    # 1,437 digits at batch 64, the last partial batch dropped
    assert field(plan, "steps per epoch") == "22"
    assert field(plan, "total steps") == "66"
    assert field(plan, "warm-up steps").startswith("11 ")
    rows = {epoch: (int(step), float(lr)) for epoch, step, lr in ROW.findall(plan)}
    assert [rows[e][0] for e in ("1", "2", "3", "last")] == [1, 23, 45, 66]
    assert rows["1"][1] == pytest.approx(1e-4)  # warmup_lr
    assert rows["last"][1] == pytest.approx(0.001)  # min_lr, reached at the last step
    assert re.search(r"^speed:\s+\d+(\.\d+)? img/s in 1 process", plan, re.M)
    assert re.search(r"^peak memory:\s+\d+\.\d+ GiB", plan, re.M)
    assert "estimated time:  train " in plan and "not measured" not in plan
    png = out / "lr_schedule.png"
    assert field(plan, "lr schedule") == str(png)
    height, width, _ = matplotlib.image.imread(png).shape
    assert width > 400 and height > 200
    # only the plot: a real run into the same --out is not refused as "already holds a run"
    assert [p.name for p in out.iterdir()] == ["lr_schedule.png"]


@pytest.mark.slow
def test_nproc_splits_the_batch_without_spawning(tmp_path):
    proc = dry_run(tmp_path / "run", "2", "--nproc", "2", "--epochs", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "per-process batch 32 = 64 / 2" in field(proc.stdout, "world size")
    assert field(proc.stdout, "steps per epoch") == "22"  # 718 per rank, 22 batches of 32
    assert "over 2 processes (assumption" in proc.stdout


@pytest.mark.slow
def test_paper_recipe_on_a_small_machine(tmp_path):
    """workers=8, resolution 224 and no data named: the embedded digits, on 2 cores."""
    proc = dry_run(tmp_path / "run", "1", "--recipe", "paper", "--max-steps-per-epoch", "2",
                   "--batch-size", "32", "--min-resolution", "160", "--ramp-epochs", "40")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert field(proc.stdout, "steps per epoch") == "2"
    assert "resolution" in proc.stdout  # the progressive-resizing column of the LR table


@pytest.mark.parametrize("args, error", [
    (["--nproc", "3"], "batch_size=64 is not divisible by the 3 processes"),
    (["0"], "--dry-run 0: expected at least 1 step to time"),
])
def test_bad_input_is_one_line(tmp_path, args, error):
    proc = dry_run(tmp_path / "run", *args)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"qlnas: error: {error}"]
    assert not (tmp_path / "run").exists()
