"""Training on the embedded dataset: DDP accuracy, determinism, resume, NaN guard, logs."""

import json
import shutil

import pytest
import timm
import torch

import qlnas  # noqa: F401
from tests.train.helpers import metrics, qlnas_train, tb_scalars, untimed

pytestmark = pytest.mark.slow

FAST = ["--model", "qlnet26n_eq3_softball_ds", "--epochs", "5", "--workers", "1"]


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
    assert untimed(metrics(ddp_runs[0])) == untimed(metrics(ddp_runs[1]))


def test_schedule_ends_at_its_floor(ddp_runs):
    """The demo recipe (5 epochs, 1 of warm-up, min_lr 0) ends at LR 0, peaks at 0.2."""
    lrs = [e.value for e in tb_scalars(ddp_runs[0]).Scalars("train/lr")]
    assert len(lrs) == 110
    assert lrs[-1] == 0.0 and float(metrics(ddp_runs[0])[-1]["lr"]) == 0.0
    assert lrs[22] == pytest.approx(0.2) and lrs[-2] > 0


def test_train_loss_is_the_mean_over_ranks(ddp_runs):
    """train/loss per step (TensorBoard) averages to the epoch's train_loss (all ranks)."""
    steps = tb_scalars(ddp_runs[0]).Scalars("train/loss")
    for epoch, row in enumerate(metrics(ddp_runs[0])):
        values = [e.value for e in steps if epoch * 22 < e.step <= (epoch + 1) * 22]
        assert sum(values) / len(values) == pytest.approx(float(row["train_loss"]), rel=1e-5)


def test_evaluated_model_is_the_saved_model(ddp_runs):
    """Both ranks evaluate rank 0's BN statistics: the val metrics of the last epoch are those
    of the checkpoint's model evaluated alone."""
    from qlnas.data import demo_dataset
    from qlnas.data.loaders import build_val_loader

    ckpt = torch.load(ddp_runs[0] / "checkpoints" / "last.pt", map_location="cpu",
                      weights_only=False)
    model = timm.create_model(ckpt["model_name"], num_classes=10)
    model.load_state_dict(ckpt["model"])
    model.eval()
    hits = loss = count = 0
    with torch.no_grad():
        for images, target in build_val_loader(demo_dataset()[1], batch_size=32, resolution=32,
                                               num_workers=1):
            logits = model(images)
            hits += (logits.argmax(1) == target).sum().item()
            loss += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
            count += len(target)
    row = metrics(ddp_runs[0])[-1]
    assert count == 360
    assert hits / count == pytest.approx(float(row["val_top1"]), abs=1e-9)
    assert loss / count == pytest.approx(float(row["val_loss"]), rel=1e-4)


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


def test_resume_refuses_another_model(tmp_path, ddp_runs):
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
