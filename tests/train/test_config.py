"""TrainConfig: recipes, YAML and the CLI's one-line errors for bad input."""

import ast
import dataclasses
import math
import subprocess
import sys
import threading
import time

import pytest

from qlnas.errors import UserError
from qlnas.train.config import RECIPES, TrainConfig, field_docs, resolve_config


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipes_are_valid(recipe):
    config = resolve_config(recipe)
    assert isinstance(config, TrainConfig)


def test_paper_recipe_matches_the_paper():
    c = resolve_config("paper")
    assert (c.optimizer, c.schedule, c.warmup_epochs, c.batch_size, c.lr, c.epochs) == \
        ("sgd", "cosine", 5.0, 192, 0.3, 50)


def test_yaml_overrides_and_unknown_key(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("lr: 0.05\nepochs: 2\narch: {form: eq4}\n")
    c = resolve_config("demo", good, {"epochs": 3})
    assert (c.lr, c.epochs, c.arch) == (0.05, 3, {"form": "eq4"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.05\nlearning_rate: 1\n")
    with pytest.raises(UserError, match=r"bad.yaml: unknown key 'learning_rate'"):
        resolve_config(None, bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("epochs: three\n")
    with pytest.raises(UserError, match=r"typo.yaml: epochs='three' has the wrong type"):
        resolve_config(None, typo)


def test_validation_names_the_field():
    with pytest.raises(ValueError, match="lr=-1.0: expected a positive number"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ValueError, match="optimizer='adam'"):
        TrainConfig(optimizer="adam")


@pytest.mark.parametrize("field, value, expected", [
    ("warmup_epochs", math.nan, "a finite number >= 0"),
    ("weight_decay", math.inf, "a finite number >= 0"),
    ("min_lr", 0.5, "a number <= lr=0.2"),  # the cosine would rise from lr to it
    ("momentum", 9.0, "a number in [0, 1)"),
    ("step_gamma", -1.0, "a finite number > 0"),
])
def test_numbers_out_of_range_are_refused(field, value, expected):
    with pytest.raises(ValueError) as err:
        TrainConfig(lr=0.2, **{field: value})
    assert str(err.value) == f"{field}={value!r}: expected {expected}"


def test_a_step_schedule_needs_a_step_length():
    # step_epochs 0 decayed the LR by step_gamma at every step, and the run "completed".
    with pytest.raises(ValueError, match="step_epochs=0.0: expected a number > 0 with schedule"):
        TrainConfig(schedule="step", step_epochs=0.0)
    assert TrainConfig(step_epochs=0.0).schedule == "cosine"  # unused by the cosine


def test_the_paper_recipe_is_the_one_paper_yaml_trains():
    # `qlnas train --recipe paper` reproduces a Table 1 row as the search trains it (it added
    # progressive resizing, 160 to 224 px, which the paper's recipe does not have).
    from qlnas.search.space import load_space

    space = load_space("search_spaces/paper.yaml")
    trial = space.train_config(space.enqueue[0], out="x")
    recipe = resolve_config("paper")
    skip = {"model", "arch", "out", "train_data", "val_data", "export"}
    differ = {f: (getattr(recipe, f), getattr(trial, f)) for f in TrainConfig.__dataclass_fields__
              if f not in skip and getattr(recipe, f) != getattr(trial, f)}
    assert differ == {}
    assert (trial.min_resolution, trial.ramp_epochs, trial.resolution) == (0, 0, 224)


def test_every_field_is_documented():
    docs = field_docs(TrainConfig)
    missing = [f for f in TrainConfig.__dataclass_fields__ if f not in docs]
    assert not missing


class _Cyclic:
    """Garbage that only the collector frees, whose finalizer lets another thread run."""

    def __init__(self):
        self.me = self

    def __del__(self):
        time.sleep(0)


def test_field_docs_hold_while_another_thread_parses():
    """The CLI's --help texts come from parsing TrainConfig's source. Python 3.11 shares the
    parser's recursion count among threads, and in the full suite a collection inside that parse
    handed the GIL to a thread that parsed too: building the parser raised SystemError."""
    stop = threading.Event()

    def parse_in_a_loop():
        while not stop.is_set():
            ast.parse("def f(x):\n    return [a for a in x if a]\n" * 20)

    thread = threading.Thread(target=parse_in_a_loop, daemon=True)
    thread.start()
    try:
        for _ in range(3):
            for _ in range(300):
                _Cyclic()
            assert field_docs(TrainConfig)["lr"] == "Peak learning rate (after warm-up)."
    finally:
        stop.set()
        thread.join()


def _qlnas(*args):
    return subprocess.run([sys.executable, "-m", "qlnas.cli", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("args,message", [
    (["--lr", "-1"], "lr=-1.0: expected a positive number"),
    (["--model", "qlnet99_nothing"], "unknown model 'qlnet99_nothing'"),
    (["--train", "/nonexistent/train.beton"], "train_data: /nonexistent/train.beton: no such"),
    (["--nproc", "2", "--batch-size", "63"], "batch_size=63 is not divisible by the 2"),
    (["--arch", "form=eq9"], "ArchSpec.form='eq9'"),
    (["--epochs", "1"], "warmup_epochs=1.0 is not shorter than epochs=1"),
    (["--sync-bn", "--nproc", "2"], "sync_bn=True needs CUDA"),
    (["--export", "ema"], "export='ema': expected model or best when ema_decay is 0"),
    (["--amp", "fp16", "--max-overflow-steps", "0"], "max_overflow_steps=0: expected a positive"),
    (["--nproc", "2", "--batch-size", "6", "--mixup", "0.8"],
     "batch_size=6 over 2 process(es) is 3 a process; mixup and cutmix pair samples"),
    (["--min-lr", "nan"], "min_lr=nan: expected a finite number >= 0"),
])
def test_cli_bad_input_one_line(tmp_path, args, message):
    proc = _qlnas("train", "--out", str(tmp_path / "run"), *args)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_regularisation_reaches_the_model():
    from qlnas.train.fit import validate

    model = validate(TrainConfig(drop_path_rate=0.2, drop_rate=0.3), 1)[3]
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates[-1] == pytest.approx(0.2) and rates == sorted(rates) and len(rates) == 7
    assert model.drop_rate == pytest.approx(0.3)
    with pytest.raises(ValueError, match="drop_path_rate=1.0: expected a number in"):
        TrainConfig(drop_path_rate=1.0)


@pytest.mark.parametrize("classes, message", [
    (lambda c: c[1:], "its 9 classes are not the 10 of {train} (label 0 is '1', not '0')"),
    (lambda c: c + ["x"], "its 11 classes are not the 10 of {train} (label 10 is 'x', not "
     "nothing)"),
])
def test_val_data_of_other_classes_is_refused(tmp_path, classes, message):
    # A val file written with another selection: its label k is another class than train's.
    import shutil

    from qlnas.data import demo_dataset, read_classes
    from qlnas.data.classes import write_classes
    from qlnas.train.fit import validate

    train, val = demo_dataset()
    other = tmp_path / "val.beton"
    shutil.copyfile(val, other)
    write_classes(other, classes(read_classes(val)))
    config = TrainConfig(train_data=str(train), val_data=str(other))
    with pytest.raises(UserError) as err:
        validate(config, 1)
    assert str(err.value) == (f"{other}: " + message.format(train=train)
                              + f"; write it with the same --subset, or with --classes {train}")
    assert validate(dataclasses.replace(config, val_data=str(val)), 1)[2] == 10
