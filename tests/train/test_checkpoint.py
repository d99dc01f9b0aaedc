"""Checkpoint files: two durable generations, fallback from a damaged one, no stale
temporaries, no non-finite state, a rollback point that cannot reproduce the failure."""

import logging
import os

import pytest
import torch
from torch import nn

from qlnas.errors import UserError
from qlnas.fileio import atomic_path, remove_stale_temporaries
from qlnas.train import checkpoint as ckpt_io
from qlnas.train.config import TrainConfig
from qlnas.train.distributed import DistInfo
from qlnas.train.engine import Progress
from qlnas.train.run import RunFiles


class _Parts:
    """The pieces RunFiles.save reads (a real model, optimizer, scheduler and scaler)."""

    def __init__(self) -> None:
        self.model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, 1)
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)
        self.ema = None


def _run(tmp_path) -> RunFiles:
    dist = DistInfo(0, 1, 0, 1, torch.device("cpu"), False)
    return RunFiles(TrainConfig(out=str(tmp_path)), dist, nn.Linear(1, 1))


def _save_steps(run, parts, *steps):
    for step in steps:
        with torch.no_grad():
            parts.model[0].weight.fill_(float(step))
        assert run.save(parts, Progress(step=step))


def test_two_generations(tmp_path):
    run, parts = _run(tmp_path), _Parts()
    _save_steps(run, parts, 0, 5, 10)
    last = ckpt_io.load_checkpoint(run.last)
    prev = ckpt_io.load_checkpoint(ckpt_io.previous_path(run.last))
    assert (last["state"]["step"], prev["state"]["step"]) == (10, 5)
    assert last["model"]["0.weight"].unique().item() == 10.0
    assert not list(run.ckpt_dir.glob(".*.tmp"))
    umask = os.umask(0)
    os.umask(umask)
    assert run.last.stat().st_mode & 0o777 == 0o666 & ~umask  # readable like any file


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete"])
def test_damaged_last_falls_back_to_previous(tmp_path, caplog, damage):
    run, parts = _run(tmp_path), _Parts()
    _save_steps(run, parts, 3, 7)
    data = run.last.read_bytes()
    if damage == "truncate":
        run.last.write_bytes(data[:len(data) // 2])
    elif damage == "garbage":
        run.last.write_bytes(b"not a checkpoint")
    else:
        run.last.unlink()  # a kill between the two renames of a save
    assert ckpt_io.has_checkpoint(run.last)
    with caplog.at_level(logging.WARNING):
        ckpt, path = run.resume_point()
    assert path.name == "last.prev.pt" and ckpt["state"]["step"] == 3
    if damage != "delete":
        assert "falling back to the previous checkpoint" in caplog.text


def test_no_readable_generation_is_one_clear_error(tmp_path):
    run, parts = _run(tmp_path), _Parts()
    _save_steps(run, parts, 1, 2)
    for p in (run.last, ckpt_io.previous_path(run.last)):
        p.write_bytes(b"\0" * 10)
    with pytest.raises(UserError, match="last.prev.pt: cannot read checkpoint"):
        run.resume_point()


def test_stale_temporaries_removed(tmp_path):
    target = tmp_path / "last.pt"
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt  # a kill: the finally clause is all that runs
    assert not target.exists()
    left = tmp_path / ".last.pt.x1y2.tmp"  # what a SIGKILL (no finally) leaves
    left.write_bytes(b"half")
    (tmp_path / "keep.pt").write_bytes(b"ok")
    assert remove_stale_temporaries(tmp_path) == [left]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.pt"]


def test_non_finite_state_is_never_a_checkpoint(tmp_path, caplog):
    run, parts = _run(tmp_path), _Parts()
    _save_steps(run, parts, 4)
    parts.model[1].running_var[0] = float("inf")  # a BN statistic past float range
    with caplog.at_level(logging.WARNING):
        assert not run.save(parts, Progress(step=5))
    assert ckpt_io.load_checkpoint(run.last)["state"]["step"] == 4
    assert "not finite" in caplog.text
    parts.model[1].running_var[0] = 1.0
    parts.optimizer.state[parts.model[0].weight]["momentum_buffer"] = \
        torch.full((4, 4), float("nan"))
    assert not ckpt_io.is_finite_state(parts.model, parts.optimizer)


def test_rollback_point_skips_the_state_that_failed(tmp_path):
    run, parts = _run(tmp_path), _Parts()
    _save_steps(run, parts, 0, 8)
    # Step 9 failed: the checkpoint at step 8 holds the weights that failed; take step 0.
    ckpt, path = run.rollback_point(Progress(step=8))
    assert ckpt["state"]["step"] == 0 and path.name == "last.prev.pt"
    # Step 12 failed: step 8 is three good steps before it.
    ckpt, path = run.rollback_point(Progress(step=11))
    assert ckpt["state"]["step"] == 8 and path.name == "last.pt"
    assert run.rollback_point(Progress(step=0)) is None


def test_resume_accepts_fields_added_since_at_their_default(tmp_path):
    old = TrainConfig().to_dict()
    del old["sync_bn"]
    ckpt = {"config": old, "state": {"world_size": 1}}
    defaults = TrainConfig().to_dict()
    ckpt_io.check_compatible(ckpt, TrainConfig().to_dict(), 1, tmp_path, defaults=defaults)
    with pytest.raises(UserError, match="sync_bn=None, this run has sync_bn=True"):
        ckpt_io.check_compatible(ckpt, {**defaults, "sync_bn": True}, 1, tmp_path,
                                 defaults=defaults)
