"""`qlnas convert`: the authors' checkpoints -> our model files, exact; bad inputs refused."""

import pytest
import timm
import torch

import qlnas  # noqa: F401 - registers the models
from qlnas.cli import main
from qlnas.models.io import load_model_file, save_model_file
from qlnas.symmetry.verify import relative_change
from tests.models.liu2023_layout import random_their_net

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.double().eval()(X)


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model", "state_dict_ema"])
def test_convert_float64_file_is_exact(tmp_path, capsys, theirs, wrapper):
    state = theirs.state_dict()
    src, out = tmp_path / "theirs.pth", tmp_path / "ours.pt"
    torch.save(state if wrapper is None else {wrapper: state, "epoch": 7}, src)
    assert main(["convert", str(src), str(out)]) == 0
    assert "100 classes" in capsys.readouterr().out
    model, meta = load_model_file(out)
    assert meta["model_name"] == "qlnet50_liu2023" and meta["num_classes"] == 100
    assert model.fc.weight.dtype == torch.float64  # loaded as written, not rounded to float32
    assert relative_change(_logits(model), _logits(theirs)) < 1e-9


def test_ema_weights_of_a_timm_checkpoint(tmp_path, theirs):
    other = random_their_net(num_classes=100, seed=1)
    src, out = tmp_path / "ckpt.pth.tar", tmp_path / "ema.pt"
    torch.save({"state_dict": theirs.state_dict(), "state_dict_ema": other.state_dict()}, src)
    assert main(["convert", str(src), str(out), "--ema"]) == 0
    model, meta = load_model_file(out)
    assert meta["converted_weights"] == "ema"
    assert relative_change(_logits(model), _logits(other)) < 1e-9


def test_float32_checkpoint_loads_with_timm_and_other_class_counts(tmp_path):
    theirs = random_their_net(num_classes=37, dtype=torch.float32)
    src, out = tmp_path / "theirs.safetensors", tmp_path / "ours.pt"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, str(src))
    assert main(["convert", str(src), str(out)]) == 0
    model = timm.create_model("qlnet50_liu2023", num_classes=37, checkpoint_path=str(out))
    assert model.fc.weight.dtype == torch.float32 and model.num_classes == 37
    assert relative_change(_logits(model), _logits(theirs)) < 1e-9  # the same float32 numbers


def _refused(capsys, src, out) -> str:
    assert main(["convert", str(src), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qlnas: error: "), err
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir()] == [src.name]  # no temporary file left
    return err[0]


def _their_file(tmp_path, state) -> tuple:
    src = tmp_path / "theirs.pth"
    torch.save(state, src)
    return src, tmp_path / "ours.pt"


def test_our_own_model_file_is_not_their_layout(tmp_path, capsys):
    src, out = tmp_path / "ours_already.pt", tmp_path / "out.pt"
    save_model_file(src, timm.create_model("qlnet26n_glb_none", num_classes=10), "qlnet26n")
    line = _refused(capsys, src, out)
    assert "already a qlnas model file (qlnet26n), not a checkpoint in the authors' layout" \
        in line


def test_a_wrapper_without_weights_is_refused(tmp_path, capsys):
    line = _refused(capsys, *_their_file(tmp_path, {"optimizer": {}, "epoch": 3}))
    assert "not a state dict, and holds none of state_dict, model, state_dict_ema" in line


def test_another_networks_state_dict_is_not_their_layout(tmp_path, capsys):
    state = timm.create_model("qlnet26n_glb_none", num_classes=10).state_dict()
    line = _refused(capsys, *_their_file(tmp_path, state))
    assert "not a checkpoint in the authors' layout" in line and "fc.bias" in line


def test_missing_keys_are_named(tmp_path, capsys, theirs):
    state = dict(theirs.state_dict())
    for key in ("layer4.2.conv3.bn.weight", "layer2.0.skip.conv.weight"):
        del state[key]
    line = _refused(capsys, *_their_file(tmp_path, state))
    assert "missing keys for qlnet50_liu2023: layer2.0.skip.conv.weight, " \
           "layer4.2.conv3.bn.weight" in line


def test_extra_keys_are_named(tmp_path, capsys, theirs):
    state = dict(theirs.state_dict())
    state["layer4.3.conv1.conv.weight"] = torch.zeros(1)
    state["head.bias"] = torch.zeros(1)
    line = _refused(capsys, *_their_file(tmp_path, state))
    assert "unexpected keys for qlnet50_liu2023: layer4.3.conv1.conv.weight, head.bias" in line


def test_wrong_shapes_are_named(tmp_path, capsys, theirs):
    state = dict(theirs.state_dict())
    state["layer1.0.conv2.weight"] = torch.zeros(256, 1, 3, 3)
    line = _refused(capsys, *_their_file(tmp_path, state))
    assert "layer1.0.conv2.weight (256, 1, 3, 3) (expected (512, 1, 3, 3))" in line


@pytest.mark.parametrize("content", [b"not a torch file", None])
def test_unreadable_or_missing_source(tmp_path, capsys, content):
    src, out = tmp_path / "theirs.pth", tmp_path / "ours.pt"
    if content is None:
        assert main(["convert", str(src), str(out)]) == 2
        assert "no such checkpoint file" in capsys.readouterr().err
        assert not out.exists()
        return
    src.write_bytes(content)
    assert "not a readable checkpoint" in _refused(capsys, src, out)


def test_init_from_hint_for_an_unconverted_file(tmp_path, capsys, theirs):
    src = tmp_path / "theirs.pth"
    torch.save(theirs.state_dict(), src)
    assert main(["symmetry", "verify", str(src)]) == 2
    assert "`qlnas convert` it first" in capsys.readouterr().err
