"""The symmetry toolkit on the authors' published design (`qlnet50_liu2023`), converted from
their key layout, and on the BN after the coefficient conv (`coef_bn`) in every form."""

import pytest
import torch

from qlnas.cli import main
from qlnas.models.convert import convert_state
from qlnas.models.io import load_model_file, save_model_file
from qlnas.models.spec import FORMS
from qlnas.symmetry.compress import count_zeros
from qlnas.symmetry.groups import random_element, random_orthogonal
from qlnas.symmetry.streams import find_streams
from qlnas.symmetry.transform import apply
from qlnas.symmetry.verify import relative_change, verify
from tests.models.liu2023_layout import random_their_net
from tests.symmetry.helpers import small_model

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


@pytest.fixture(scope="module")
def converted():
    """Their network with random weights and BN statistics, converted: float64, eval."""
    return convert_state(random_their_net(num_classes=100).state_dict()).eval()


def _change(model, transforms) -> float:
    with torch.no_grad():
        return relative_change(apply(model, transforms)(X), model(X))


def test_derived_groups(converted):
    groups = {s.name: s.group for s in find_streams(converted)}
    assert groups == {"stage1": "perm_pos_scale", "stage2": "o", "stage3": "o", "stage4": "o"}


def test_notebook_claim_orthogonal_change_across_stages_3_and_4(converted):
    """Their notebook: an orthogonal change of variables on the streams of stages 3 and 4
    leaves the output unchanged; a non-orthogonal one does not (hardball is radial)."""
    gen = torch.Generator().manual_seed(0)
    q = {"stage3": random_orthogonal(256, gen), "stage4": random_orthogonal(512, gen)}
    assert _change(converted, q) < 1e-12
    g = {"stage3": random_element("gl", 256, gen), "stage4": random_element("gl", 512, gen)}
    assert _change(converted, g) > 1e-3


def test_stage1_is_cut_by_the_stem(converted):
    gen = torch.Generator().manual_seed(1)
    assert _change(converted, {"stage1": random_element("perm_pos_scale", 64, gen)}) < 1e-12
    assert _change(converted, {"stage1": random_orthogonal(64, gen)}) > 1e-3


def test_cli_on_a_converted_float64_file(tmp_path, capsys, converted):
    src, out = tmp_path / "liu.pt", tmp_path / "small.pt"
    save_model_file(src, converted, "qlnet50_liu2023")
    assert main(["symmetry", "verify", str(src), "--trials", "1", "--size", "32",
                 "--batch", "1"]) == 0  # every stream's derived group holds
    text = capsys.readouterr().out
    for row in ("| stage1 | 64 | perm_pos_scale | perm_pos_scale |", "| stage4 | 512 | o | o |"):
        assert row in text
    assert "coef_bn: the BN after each coefficient conv" in text
    assert main(["symmetry", "compress", str(src), "--out", str(out), "--size", "32"]) == 0
    text = capsys.readouterr().out
    assert "after 171,584" in text  # each stage's last proj triangular (stages 2-4)
    change = float(text.split("random inputs ")[1].split(",")[0])
    assert change < 1e-12  # float64 end to end (the file is not rounded to float32 first)
    compressed, meta = load_model_file(out)
    compressed.eval()
    assert meta["model_name"] == "qlnet50_liu2023" and count_zeros(compressed) >= 171_584
    with torch.no_grad():
        assert relative_change(compressed(X), converted(X)) < 1e-12
    canon = tmp_path / "canon.pt"
    assert main(["symmetry", "canonicalize", str(src), "--out", str(canon), "--size", "32"]) == 0
    assert "stage4 (o)" in capsys.readouterr().out
    with torch.no_grad():
        assert relative_change(load_model_file(canon)[0].eval()(X), converted(X)) < 1e-12


@pytest.mark.parametrize("form", FORMS)
def test_coef_bn_keeps_every_derived_group(form):
    act = "none" if form == "glb" else "hardtanh"
    model = small_model(form, act, coef_bn=True)
    rows = verify(model, trials=1, size=32, batch=1)
    assert all(r.holds for r in rows), rows
    if form == "glb":
        assert {r.group for r in rows if r.stream != "all"} == {"gl"}
