"""The LR schedule ends where it says: warm-up within `epochs`, the floor at the last step."""

import math

import pytest

from qlnas.errors import UserError
from qlnas.train.config import RECIPES, TrainConfig, resolve_config
from qlnas.train.schedule import lr_curve


@pytest.mark.parametrize("recipe, steps_per_epoch", [("demo", 22), ("paper", 100)])
def test_cosine_reaches_floor_at_last_step(recipe, steps_per_epoch):
    config = resolve_config(recipe, overrides={"min_lr": 1e-5})
    lrs = lr_curve(config, steps_per_epoch)
    assert len(lrs) == config.epochs * steps_per_epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)
    assert lrs[0] == pytest.approx(config.warmup_lr)
    assert lrs[warmup] == pytest.approx(config.lr)  # the peak, right after warm-up
    assert max(lrs) == pytest.approx(config.lr)
    assert lrs[-1] == pytest.approx(1e-5, abs=1e-12)
    assert lrs[-2] > lrs[-1]
    tail = lrs[warmup:]
    assert all(a >= b for a, b in zip(tail, tail[1:], strict=False))


def test_paper_recipe_is_50_epochs_with_5_of_warmup():
    config = resolve_config("paper")
    lrs = lr_curve(config, 10)
    assert len(lrs) == 500 and RECIPES["paper"]["epochs"] == 50
    assert lrs[50] == pytest.approx(0.3) and lrs[-1] == 0.0
    # Half way through the annealing the cosine is at half of its peak.
    assert lrs[50 + (499 - 50) // 2] == pytest.approx(0.15, rel=0.01)


def test_short_run_from_the_issue_ends_at_zero():
    """`qlnas train --epochs 2 --warmup-epochs 0.5 --lr 0.2 --min-lr 0` ended at 0.0345."""
    config = TrainConfig(epochs=2, warmup_epochs=0.5, lr=0.2, min_lr=0.0)
    lrs = lr_curve(config, 22)
    assert lrs[-1] == 0.0 and lrs[11] == pytest.approx(0.2)


def test_step_schedule_last_value():
    config = TrainConfig(epochs=9, schedule="step", step_epochs=3, step_gamma=0.1, lr=1.0,
                         warmup_epochs=1)
    lrs = lr_curve(config, 10)
    assert lrs[10] == pytest.approx(1.0)  # warm-up done, before the first decay
    assert lrs[30] == pytest.approx(0.1) and lrs[60] == pytest.approx(0.01)
    assert lrs[-1] == pytest.approx(0.01)


@pytest.mark.parametrize("warmup", [2.0, 3.0])
def test_warmup_as_long_as_the_run_is_refused(warmup):
    with pytest.raises(ValueError, match="warmup_epochs=.* is not shorter than epochs=2"):
        TrainConfig(epochs=2, warmup_epochs=warmup)


def test_warmup_that_rounds_to_the_whole_run_is_refused():
    """0.99 of a 22-step epoch rounds to 22 warm-up steps: nothing left to anneal."""
    with pytest.raises(UserError, match=r"warmup_epochs=0.99 is not shorter .*\(22 of 22"):
        lr_curve(TrainConfig(epochs=1, warmup_epochs=0.99), 22)


def test_one_step_run_without_warmup():
    lrs = lr_curve(TrainConfig(epochs=1, warmup_epochs=0), 1)
    assert lrs == [pytest.approx(0.2)] and all(math.isfinite(v) for v in lrs)
