"""`init_from`: a run starts from a model file's weights (a fresh head for other classes)."""

import pytest
import timm
import torch
import yaml

import qlnas  # noqa: F401 - registers the models
from qlnas.errors import UserError
from qlnas.models.io import save_model_file
from qlnas.train.config import TrainConfig
from qlnas.train.fit import validate
from tests.train.helpers import qlnas_train


def _file(tmp_path, name: str, num_classes: int, seed: int = 5):
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=num_classes)
    path = tmp_path / f"{name}_{num_classes}.pt"
    save_model_file(path, model, name)
    return path, model


def test_config_validates_init_from():
    with pytest.raises(ValueError, match="init_from='': expected the path of a model file"):
        TrainConfig(init_from="")
    with pytest.raises(UserError, match="init_from=3 has the wrong type"):
        TrainConfig.from_dict({"init_from": 3})


@pytest.mark.slow  # opens the embedded dataset (the loader's JIT on first use)
@pytest.mark.parametrize("num_classes", [10, 100])
def test_weights_come_from_the_file_and_the_head_when_it_fits(tmp_path, num_classes):
    path, source = _file(tmp_path, "qlnet50_liu2023", num_classes)
    _, _, classes, model = validate(TrainConfig(model="qlnet50_liu2023", init_from=str(path)), 1)
    assert classes == 10  # the embedded digits
    src = source.state_dict()
    for key, value in model.state_dict().items():
        if key.startswith("fc."):
            assert torch.equal(value, src[key]) == (num_classes == 10), key
        else:
            assert torch.equal(value, src[key]), key


@pytest.mark.slow
def test_bad_files_are_one_line_naming_the_field(tmp_path):
    with pytest.raises(UserError, match="init_from: .*missing.pt: no such model file"):
        validate(TrainConfig(init_from=str(tmp_path / "missing.pt")), 1)
    path, _ = _file(tmp_path, "qlnet26n_glb_none", 10)
    with pytest.raises(UserError, match="init_from: .*do not fit this model"):
        validate(TrainConfig(model="qlnet26n_eq3_softball_ds", init_from=str(path)), 1)


@pytest.mark.slow  # a training process: one epoch of two steps, then validation
def test_train_cli_runs_and_records_it(tmp_path):
    path, _ = _file(tmp_path, "qlnet26n_glb_softball_ds", 100)
    out = tmp_path / "run"
    proc = qlnas_train(out, "--model", "qlnet26n_glb_softball_ds", "--init-from", str(path),
                       "--epochs", "1", "--warmup-epochs", "0", "--max-steps-per-epoch", "2",
                       "--workers", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "a fresh classifier" in proc.stderr
    assert yaml.safe_load((out / "config.yaml").read_text())["init_from"] == str(path)
