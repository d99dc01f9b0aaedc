"""Model files: a file loads into a model of its weights' dtype, and `init_from_file`."""

import pytest
import timm
import torch

import qlnas  # noqa: F401 - registers the models
from qlnas.errors import UserError
from qlnas.models.io import init_from_file, load_model_file, save_model_file
from qlnas.symmetry.fold import randomize_bn


def _model(name: str = "qlnet26n_glb_softball_ds", num_classes: int = 10, seed: int = 0,
           **arch):
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=num_classes, **arch)
    return randomize_bn(model, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_file_loads_in_its_own_dtype_bit_for_bit(tmp_path, dtype):
    model = _model().to(dtype)
    path = tmp_path / "m.pt"
    save_model_file(path, model, "qlnet26n_glb_softball_ds")
    loaded, _ = load_model_file(path)
    assert loaded.fc.weight.dtype == dtype
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_init_from_file_copies_weights_and_keeps_a_fresh_head(tmp_path):
    path = tmp_path / "m.pt"
    source = _model(num_classes=10, seed=1)
    save_model_file(path, source, "qlnet26n_glb_softball_ds")
    same = _model(num_classes=10, seed=2)
    assert init_from_file(same, path) is True
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in same.state_dict().items())
    other = _model(num_classes=3, seed=2)
    fresh = other.fc.weight.clone()
    assert init_from_file(other, path) is False
    assert torch.equal(other.fc.weight, fresh)
    assert torch.equal(other.stages[3][1].proj.weight, source.stages[3][1].proj.weight)


def test_init_from_file_names_what_does_not_fit(tmp_path):
    path = tmp_path / "m.pt"
    save_model_file(path, _model(), "qlnet26n_glb_softball_ds")
    with pytest.raises(UserError, match=r"do not fit this model: it has other shapes for "
                                        r"stages\.0\.0\.coef\.weight"):
        init_from_file(_model(expansion=6), path)
    with pytest.raises(UserError, match=r"it has keys the model lacks: stem\.lin_conv\.weight"):
        init_from_file(_model("qlnet26n_eq3_softball_ds"), path)
