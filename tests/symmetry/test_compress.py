"""Lossless compression of the GL block (acceptance numbers of issue 6, float64)."""

import pytest
import timm
import torch

from qlnas.cli import main
from qlnas.models.io import save_model_file
from qlnas.symmetry.compress import compress, count_zeros
from qlnas.symmetry.streams import find_streams
from qlnas.symmetry.verify import relative_change
from tests.symmetry.helpers import preset, small_model


def _check_written(path, name, original, min_zeros):
    data = torch.load(path, weights_only=False)
    assert data["model_name"] == name and "state_dict" in data and "num_classes" in data
    model = timm.create_model(name, num_classes=data["num_classes"]).double().eval()
    model.load_state_dict(data["state_dict"])
    assert count_zeros(model) >= min_zeros
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        change = relative_change(model(x), original.double().eval()(x))
    assert change < 1e-10
    return data


@pytest.mark.parametrize("name, strategy, min_zeros, exact", [
    ("qlnet50_glb_softball_ds", "auto", 140_000, None),
    ("qlnet50_glb_none", "skip", 170_000, 171_584),  # the doc's number: S = [I; 0]
])
def test_compress_qlnet50(tmp_path, capsys, name, strategy, min_zeros, exact):
    model = preset(name)
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    save_model_file(src, model, name)
    assert main(["symmetry", "compress", str(src), "--out", str(out),
                 "--strategy", strategy, "--size", "32"]) == 0
    text = capsys.readouterr().out
    assert "exact zeros: before" in text and "embedded digits" in text and "sparsely" in text
    data = _check_written(out, name, model, min_zeros)
    if exact is not None:
        zeros = sum(int((v == 0).sum()) for k, v in data["state_dict"].items()
                    if k.endswith("weight") and "bn" not in k)
        assert zeros == exact


def test_training_checkpoint_is_accepted_and_output_is_plain(tmp_path):
    model = small_model("glb", "softball").float()
    ckpt = {"model": model.state_dict(), "model_name": "qlnet26n",
            "spec": model.spec.to_dict(), "epoch": 3}
    src, out = tmp_path / "ckpt.pt", tmp_path / "out.pt"
    torch.save(ckpt, src)
    assert main(["symmetry", "compress", str(src), "--out", str(out), "--size", "32"]) == 0
    data = torch.load(out, weights_only=False)
    assert {"model_name", "num_classes", "state_dict"} <= set(data)
    assert "model" not in data


def test_strategies_count_what_the_group_allows():
    # The stem's stream (32, linear stem, no activation) carries GL; stages 16..128 O(n).
    model = small_model("glb", "softball", stem_linear=True)
    assert {s.name: s.group for s in find_streams(model)} == {
        "stem": "gl", "stage1": "o", "stage2": "o", "stage3": "o", "stage4": "o"}
    last = compress(model, "last")
    assert last.plan.strategy == "last"
    # Each stream's last writer: [I, *] under GL (n^2 - n zeros), triangular under O(n).
    assert last.zeros_after - last.zeros_before == 32 * 31 + sum(n * (n - 1) // 2
                                                                 for n in (16, 32, 64, 128))
    skip = compress(model, "skip")
    assert skip.plan.strategy == "skip" and skip.plan.count > 0
    assert compress(model, "auto").plan.count == max(last.plan.count, skip.plan.count)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        for result in (last, skip):
            assert relative_change(result.model(x), model(x)) < 1e-10


@pytest.mark.parametrize("form, act", [("eq3", "softball"), ("eq5", "none"), ("glb", "relu")])
def test_monomial_only_models_are_refused(tmp_path, capsys, form, act):
    model = small_model(form, act, stem_linear=False)  # (a linear stem would carry GL)
    src = tmp_path / "in.pt"
    save_model_file(src, model, "qlnet26n")
    assert main(["symmetry", "compress", str(src), "--out", str(tmp_path / "o.pt")]) == 2
    err = capsys.readouterr().err
    assert "monomial" in err and "nothing compressed" in err
    assert not (tmp_path / "o.pt").exists()
