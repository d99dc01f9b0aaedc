"""Canonicalisation: copies of one model moved by different group elements come out equal."""

import pytest
import timm
import torch

from qlnas.cli import main
from qlnas.models import ArchSpec, QLNet
from qlnas.models.io import load_model_file, save_model_file
from qlnas.symmetry.canonical import canonicalize
from qlnas.symmetry.streams import find_streams
from qlnas.symmetry.transform import apply
from qlnas.symmetry.verify import relative_change, sample_transforms
from tests.symmetry.helpers import max_rel_diff, small_model

CASES = [("eq3", "softball", {}), ("eq3", "none", {"weight_sharing": False}),
         ("eq4", "hardtanh", {}), ("eq5", "hardball", {}), ("eq6", "relu", {}),
         ("eq7", "none", {}), ("glb", "none", {"stem_linear": True}), ("glb", "softball", {}),
         ("glb", "relu", {})]


@pytest.mark.parametrize("form, act, kw", CASES)
def test_canonical_form_is_invariant_under_the_group(form, act, kw):
    model = small_model(form, act, **kw)
    groups = {s.name: s.group for s in find_streams(model)}
    gen = torch.Generator().manual_seed(7)
    a = apply(model, sample_transforms(model, groups, gen))
    b = apply(model, sample_transforms(model, groups, gen))
    assert max_rel_diff(a, b) > 1e-2  # the two copies really differ
    ca, cb = canonicalize(a), canonicalize(b)
    assert max_rel_diff(ca, cb) < 1e-9
    assert max_rel_diff(ca, canonicalize(model)) < 1e-9
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert relative_change(ca(x), model(x)) < 1e-10


def test_canonical_gauge_sorts_and_fixes_signs():
    from qlnas.symmetry.canonical import _gauge
    from qlnas.symmetry.fold import fold_bn

    c = fold_bn(canonicalize(small_model("eq3", "hardtanh")))
    for s in find_streams(c):
        d, key = _gauge(c, s)
        assert torch.all(key[:-1] >= key[1:]), s.name  # sorted, largest first
        assert torch.allclose(d, torch.ones_like(d)), s.name  # already in its gauge


def test_glb_canonical_writer_is_in_normal_form():
    c = canonicalize(small_model("glb", "softball"))
    a = c.stages[3][1].proj.weight[:, :, 0, 0]  # O(128): upper triangular, positive diagonal
    assert torch.count_nonzero(torch.tril(a, -1)) == 0
    assert (torch.diagonal(a) > 0).all()


def test_cli_canonicalize_writes_plain_file(tmp_path, capsys):
    model = small_model("eq4", "softball")
    src, out = tmp_path / "in.pt", tmp_path / "canon.pt"
    save_model_file(src, model, "qlnet26n")
    assert main(["symmetry", "canonicalize", str(src), "--out", str(out), "--size", "32"]) == 0
    assert "relative output change" in capsys.readouterr().out
    data = torch.load(out, weights_only=False)
    assert {"model_name", "num_classes", "state_dict"} <= set(data)
    assert data["state_dict"]["fc.weight"].dtype == torch.float64
    loaded = QLNet(ArchSpec.from_dict(data["spec"])).double().eval()
    loaded.load_state_dict(data["state_dict"])
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert relative_change(loaded(x), model(x)) < 1e-10
    # load_model_file builds the model in the file's dtype: float64, so nothing is rounded.
    loaded64, _ = load_model_file(out)
    assert loaded64.fc.weight.dtype == torch.float64
    with torch.no_grad():
        assert relative_change(loaded64.eval()(x), model(x)) < 1e-10
    # timm builds a float32 model: the same function to float32 precision.
    loaded32 = timm.create_model("qlnet26n", checkpoint_path=str(out), num_classes=10,
                                 **{k: v for k, v in data["spec"].items()
                                    if k not in ("num_classes",)}).eval()
    with torch.no_grad():
        assert relative_change(loaded32(x.float()).double(), model(x)) < 1e-4
