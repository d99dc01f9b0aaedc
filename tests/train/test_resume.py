"""Exact resume: a 2-process run with mixup, cutmix and EMA, killed by SIGKILL and resumed,
ends with the weights and metrics of the run that was never interrupted."""

import json
import shutil

import pytest
import torch

from qlnas.train.checkpoint import generations
from tests.train.helpers import (
    kill_at_checkpoint,
    largest_relative_difference,
    metrics,
    qlnas_train,
    tb_scalars,
    tb_summary_tags,
    untimed,
)

pytestmark = pytest.mark.slow

# 10 steps of 2 x 32 images per epoch, 3 epochs; the regularisers that draw random numbers.
ARGS = ["--epochs", "3", "--max-steps-per-epoch", "10", "--warmup-epochs", "0.5",
        "--mixup", "0.8", "--cutmix", "1.0", "--ema-decay", "0.9", "--workers", "1"]


def final_state(out):
    return torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    proc = qlnas_train(out, *ARGS, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def assert_same_run(resumed, straight):
    a, b = final_state(resumed), final_state(straight)
    diffs = {part: largest_relative_difference(a[part], b[part]) for part in ("model", "ema")}
    print(f"largest relative weight difference after resume: {diffs}")
    assert max(diffs.values()) < 1e-6, diffs
    assert untimed(metrics(resumed)) == untimed(metrics(straight))
    rng_a, rng_b = a["rng"], b["rng"]
    assert len(rng_a) == 2 and not torch.equal(rng_a[0]["torch"], rng_a[1]["torch"])
    assert all((x["numpy"][1] == y["numpy"][1]).all() for x, y in zip(rng_a, rng_b,
                                                                       strict=True))


def test_kill_mid_epoch_then_resume_is_exact(tmp_path, straight):
    out = tmp_path / "run"
    args = [*ARGS, "--checkpoint-steps", "4"]
    state = kill_at_checkpoint(out, args, lambda s: s["epoch"] >= 1 and s["batch"] > 0)
    assert 0 < state["batch"] < 10
    done = qlnas_train(out, *args, "--resume", nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(out, straight)
    # TensorBoard: what the killed run logged past its checkpoint is gone, one step once,
    # one HParams session.
    acc = tb_scalars(out)
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == list(range(1, 31))
    assert [e.value for e in acc.Scalars("train/loss")] == \
        [e.value for e in tb_scalars(straight).Scalars("train/loss")]
    assert tb_summary_tags(out).count("_hparams_/session_start_info") == 1


def test_kill_between_epochs_then_resume_is_exact(tmp_path, straight):
    out = tmp_path / "run"
    state = kill_at_checkpoint(out, ARGS, lambda s: s["epoch"] >= 1 and s["batch"] == 0)
    assert state["batch"] == 0
    done = qlnas_train(out, *ARGS, "--resume", nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(out, straight)


def test_truncated_last_checkpoint_falls_back(tmp_path, straight):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    last = out / "checkpoints" / "last.pt"
    data = last.read_bytes()
    last.write_bytes(data[:len(data) // 3])  # a crash half way through writing (NFS)
    stale = out / "checkpoints" / ".last.pt.k1ll3d.tmp"
    stale.write_bytes(data[:100])
    done = qlnas_train(out, *ARGS, "--resume", nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "falling back to the previous checkpoint" in done.stderr
    assert not stale.exists()
    # The previous generation is the end of epoch 2: epoch 3 is trained again, the same way.
    assert_same_run(out, straight)


def test_resume_with_more_epochs_anneals_over_the_new_length(tmp_path):
    out = tmp_path / "run"
    args = ["--max-steps-per-epoch", "6", "--warmup-epochs", "0", "--min-lr", "0.001",
            "--workers", "1"]
    first = qlnas_train(out, "--epochs", "2", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert float(metrics(out)[-1]["lr"]) == pytest.approx(0.001)
    more = qlnas_train(out, "--epochs", "3", *args, "--resume")
    assert more.returncode == 0, more.stderr[-3000:]
    lrs = {e.step: e.value for e in tb_scalars(out).Scalars("train/lr")}
    added = [lrs[s] for s in range(13, 19)]
    assert added[-1] == pytest.approx(0.001)  # the floor, at the new last step
    assert all(a > b for a, b in zip(added, added[1:], strict=False))  # still annealing
    assert added[0] > 0.01


def test_a_streamed_run_resumed_under_auto_reads_on_streamed_and_is_exact(tmp_path):
    """The large-dataset order (qlnas.data.order): killed mid-epoch, resumed with
    `--data-mode auto` (which would cache the small demo file), it goes on in the order it
    started with and ends where the uninterrupted streamed run does."""
    args = [*ARGS, "--epochs", "2", "--max-steps-per-epoch", "6", "--checkpoint-steps", "2"]
    straight = tmp_path / "straight"
    proc = qlnas_train(straight, *args, "--data-mode", "streamed", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # checkpoint_steps divides the epoch: the last two generations are two steps apart (the
    # step save at an epoch's end used to duplicate the epoch-end save, leaving no rollback).
    assert [c["state"]["step"] for c, _ in generations(straight / "checkpoints" / "last.pt")] \
        == [12, 10]
    out = tmp_path / "run"
    state = kill_at_checkpoint(out, [*args, "--data-mode", "streamed"],
                               lambda s: s["epoch"] >= 1 and s["batch"] > 0)
    assert state["data_mode"] == "streamed" and 0 < state["batch"] < 6
    done = qlnas_train(out, *args, "--data-mode", "auto", "--resume", nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reading the data streamed, as the run did before it was resumed" in done.stderr
    assert_same_run(out, straight)
    assert json.loads((out / "result.json").read_text())["data_mode"] == "streamed"
