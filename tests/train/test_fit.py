"""Training on the embedded dataset: DDP accuracy, determinism, resume, NaN guard, logs."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import timm
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import qlnas  # noqa: F401

pytestmark = pytest.mark.slow

FAST = ["--model", "qlnet26n_eq3_softball_ds", "--epochs", "5", "--workers", "1"]


def qlnas_train(out, *args, nproc=1, timeout=600):
    cmd = [sys.executable, "-m", "qlnas.cli", "train", "--out", str(out), "--nproc", str(nproc),
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def metrics(out):
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def tb_scalars(out):
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Two identical 2-process gloo runs of the demo recipe."""
    root = tmp_path_factory.mktemp("ddp")
    runs = []
    for name in ("a", "b"):
        proc = qlnas_train(root / name, *FAST, nproc=2)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(root / name)
    return runs


def test_ddp_reaches_90_percent(ddp_runs):
    rows = metrics(ddp_runs[0])
    assert len(rows) == 5
    assert float(rows[-1]["val_top1"]) >= 0.90, rows[-1]
    result = json.loads((ddp_runs[0] / "result.json").read_text())
    assert result["status"] == "completed" and result["epochs_run"] == 5


def test_same_seed_same_metrics(ddp_runs):
    a, b = metrics(ddp_runs[0]), metrics(ddp_runs[1])
    timing = {"img_per_sec", "epoch_time"}
    for ra, rb in zip(a, b, strict=True):
        assert {k: v for k, v in ra.items() if k not in timing} == \
            {k: v for k, v in rb.items() if k not in timing}


def test_checkpoints_and_export(ddp_runs):
    out = ddp_runs[0]
    ckpt = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    for key in ("optimizer", "scheduler", "scaler", "rng", "config", "state"):
        assert key in ckpt
    assert ckpt["state"]["epoch"] == 5 and ckpt["state"]["world_size"] == 2
    assert (out / "checkpoints" / "best.pt").is_file()
    spec = json.loads((out / "model_spec.json").read_text())
    model = timm.create_model(spec["model_name"], num_classes=10,
                              checkpoint_path=str(out / "model.pt"))
    ref = timm.create_model(spec["model_name"], num_classes=10)
    ref.load_state_dict(ckpt["model"])
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), ref.eval()(x))
    info = json.loads((out / "run_info.json").read_text())
    assert info["versions"]["torch"] and "git_revision" in info
    assert (out / "config.yaml").is_file()


def test_tensorboard_scalars_and_hparams(ddp_runs):
    acc = tb_scalars(ddp_runs[0])
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/img_per_sec", "train/grad_norm", "val/top1",
            "val/top5", "val/loss", "events/nan"} <= tags
    assert len(acc.Scalars("val/top1")) == 5
    plugins = acc.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in plugins
    from tensorboard.plugins.hparams import plugin_data_pb2

    data = plugin_data_pb2.HParamsPluginData.FromString(
        plugins["_hparams_/session_start_info"])
    hp = data.session_start_info.hparams
    assert hp["model"].string_value == "qlnet26n_eq3_softball_ds"
    assert hp["arch/form"].string_value == "eq3" and hp["lr"].number_value == 0.2


def test_sigkill_mid_epoch_then_resume(tmp_path, ddp_runs):
    out = tmp_path / "run"
    args = [*FAST, "--checkpoint-steps", "7"]
    cmd = [sys.executable, "-m", "qlnas.cli", "train", "--out", str(out), "--nproc", "2", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    last = out / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    # Wait for a mid-epoch checkpoint of epoch 2 (step 7 of 22 per epoch: 29 > 22).
    while time.time() < deadline:
        if last.is_file():
            state = torch.load(last, map_location="cpu", weights_only=False)["state"]
            if state["epoch"] >= 1 and state["batch"] > 0:
                break
        time.sleep(0.5)
    else:
        pytest.fail("no mid-epoch checkpoint appeared")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    torch.load(last, map_location="cpu", weights_only=False)  # never a broken checkpoint
    done = qlnas_train(out, *args, "--resume", nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed, straight = metrics(out), metrics(ddp_runs[0])
    assert [r["epoch"] for r in resumed] == [str(e) for e in range(1, 6)]
    assert resumed[-1]["step"] == straight[-1]["step"]
    assert float(resumed[-1]["lr"]) == pytest.approx(float(straight[-1]["lr"]), rel=1e-9)


def test_resume_refuses_another_model(tmp_path, ddp_runs):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(ddp_runs[0], out)
    proc = qlnas_train(out, *FAST, "--model", "qlnet26n_eq4_softball_ds", "--resume")
    assert proc.returncode == 2
    assert "was written with model='qlnet26n_eq3_softball_ds'" in proc.stderr


def test_nan_stop_within_one_step(tmp_path):
    out = tmp_path / "nan"
    proc = qlnas_train(out, *FAST, "--lr", "1e4", "--warmup-epochs", "0", "--on-nan", "stop")
    assert proc.returncode == 3, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "diverged" and result["nan_events"] == 1
    acc = tb_scalars(out)
    nan_step = acc.Scalars("events/nan")[-1].step
    trained = [e.step for e in acc.Scalars("train/loss")] or [0]
    assert max(trained) == nan_step - 1  # no update after the first non-finite step
    assert nan_step == result["steps"] + 1


def test_nan_rollback_lowers_lr_and_continues(tmp_path):
    out = tmp_path / "rollback"
    proc = qlnas_train(out, *FAST, "--epochs", "2", "--lr", "1e4", "--warmup-epochs", "0",
                       "--on-nan", "rollback", "--nan-lr-factor", "1e-5", "--max-rollbacks", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "completed" and result["epochs_run"] == 2
    assert result["rollbacks"] >= 1 and result["nan_events"] == result["rollbacks"]
    rows = metrics(out)
    assert float(rows[-1]["lr_scale"]) == pytest.approx(1e-5 ** result["rollbacks"])
