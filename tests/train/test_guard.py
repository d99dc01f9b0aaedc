"""Divergence guards that recover (NaN rollback, fp16 loss scaling) and an export of the
weights that validate best."""

import json

import pytest
import torch

from qlnas.models.io import load_model_file
from tests.train.helpers import metrics, qlnas_train, tb_scalars

pytestmark = pytest.mark.slow

SHORT = ["--epochs", "1", "--max-steps-per-epoch", "8", "--warmup-epochs", "0", "--workers", "1"]


def result(out):
    return json.loads((out / "result.json").read_text())


def test_rollback_when_the_failure_follows_a_checkpoint(tmp_path):
    """A checkpoint after every step, so the first non-finite step falls right after one.
    LR 0.1 for 4 steps, then 1e5: the weights blow up within two steps. The checkpoint of the
    step before the failure holds the weights that fail; the run must go one further back."""
    out = tmp_path / "run"
    proc = qlnas_train(out, *SHORT, "--lr", "0.1", "--schedule", "step", "--step-epochs", "0.5",
                       "--step-gamma", "1e6", "--checkpoint-steps", "1", "--on-nan", "rollback",
                       "--nan-lr-factor", "1e-7", "--max-rollbacks", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = result(out)
    assert res["status"] == "completed" and res["steps"] == 8
    assert res["rollbacks"] == 1 and res["nan_events"] == 1
    assert "rollback 1/2 to last.prev.pt" in proc.stderr
    nan_step = tb_scalars(out).Scalars("events/nan")[-1].step
    assert 5 <= nan_step <= 8
    assert float(metrics(out)[-1]["lr_scale"]) == pytest.approx(1e-7)
    ckpt = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values()
               if t.is_floating_point())


def test_fp16_overflow_steps_are_skipped_and_counted(tmp_path):
    """A loss scale of 2^20 overflows fp16 gradients: the scaler skips those steps and halves
    its scale down to one that fits; the run completes."""
    out = tmp_path / "run"
    proc = qlnas_train(out, *SHORT, "--amp", "fp16", "--fp16-init-scale", str(2.0 ** 20))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = result(out)
    assert res["status"] == "completed" and res["nan_events"] == 0
    acc = tb_scalars(out)
    overflows = [e.value for e in acc.Scalars("train/overflow")]
    assert 1 <= overflows[-1] < 8 and overflows[-1] == res["overflows"]
    scales = [e.value for e in acc.Scalars("train/loss_scale")]
    assert scales[0] == 2.0 ** 19 and scales[-1] < 2.0 ** 20
    ckpt = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["scaler"]["scale"] == scales[-1]
    assert ckpt["state"]["overflow_streak"] == 0


def test_fp16_too_many_overflows_in_a_row_is_divergence(tmp_path):
    out = tmp_path / "run"
    proc = qlnas_train(out, *SHORT, "--amp", "fp16", "--fp16-init-scale", str(2.0 ** 30),
                       "--max-overflow-steps", "3")
    assert proc.returncode == 3, proc.stderr[-3000:]
    res = result(out)
    assert res["status"] == "diverged" and res["overflows"] == 2 and res["steps"] == 2


@pytest.mark.parametrize("export", ["ema", "best"])
def test_export_is_the_weights_that_validate_better(tmp_path, export):
    out = tmp_path / "run"
    proc = qlnas_train(out, "--epochs", "2", "--max-steps-per-epoch", "10",
                       "--warmup-epochs", "0.5", "--ema-decay", "0.8", "--workers", "1",
                       "--export", export)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = metrics(out)[-1]
    ema_better = float(row["val_top1_ema"]) > float(row["val_top1"])
    expected = "ema" if export == "ema" or ema_better else "model"
    assert json.loads((out / "model_spec.json").read_text())["weights"] == expected
    assert result(out)["exported"] == expected
    ckpt = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    model, _ = load_model_file(out / "model.pt")
    for key, value in model.state_dict().items():
        assert torch.equal(value, ckpt[expected][key]), key
    acc = tb_scalars(out)
    assert [e.value for e in acc.Scalars("val_ema/top1")] == \
        pytest.approx([float(r["val_top1_ema"]) for r in metrics(out)])
    best = torch.load(out / "checkpoints" / "best.pt", map_location="cpu", weights_only=False)
    scores = [float(r["val_top1_ema"] if export == "ema" else
                    max(float(r["val_top1"]), float(r["val_top1_ema"]))) for r in metrics(out)]
    assert best["val_top1"] == pytest.approx(max(scores))
