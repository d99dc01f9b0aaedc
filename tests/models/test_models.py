"""Every registered variant builds and trains; the family matches the paper's Table 1."""

import pytest
import timm
import torch

import qlnas  # noqa: F401
from qlnas.models import ArchSpec, QLNet, name_to_spec, spec_to_name
from qlnas.models.complexity import TABLE1, count_macs, table1_rows

ALL = timm.list_models("qlnet*")


def test_registry_lists_every_variant():
    for size in ("qlnet50", "qlnet26", "qlnet26n"):
        assert size in ALL
    for row in TABLE1:
        if row.startswith("qlnet"):
            assert row in ALL
    assert "qlnet50_glb_softball_ds" in ALL and "qlnet50_glb_none" in ALL


@pytest.mark.parametrize("name", ALL)
def test_forward_backward_finite(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    # The zero-initialised last BN makes every block the identity; perturb it so the
    # products inside each block are exercised too.
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_table1_within_one_percent():
    rows = table1_rows()
    assert len(rows) == 12  # 10 paper rows and the two baselines
    for row in rows:
        assert abs(row["error_pct"]) < 1.0, row


def test_gmacs_counted():
    resnet = count_macs(timm.create_model("resnet50"), 224)
    eq3 = count_macs(timm.create_model("qlnet50_eq3_softball_ds"), 224)
    assert 4.0e9 < resnet < 4.2e9
    assert 1.6e9 < eq3 < 1.7e9


@pytest.mark.parametrize("name", [n for n in ALL if "_" in n])
def test_name_spec_round_trip(name):
    spec = name_to_spec(name)
    assert spec_to_name(spec) == name
    assert timm.create_model(name).spec == spec


def test_generic_entry_takes_spec_kwargs():
    model = timm.create_model("qlnet26n", form="eq5", act="hardball", act_at="all",
                              weight_sharing=False, expansion=6, num_classes=7)
    assert model.spec == ArchSpec(form="eq5", act="hardball", act_at="all",
                                  weight_sharing=False, expansion=6, depths=(2, 2, 2, 2),
                                  widths=(32, 64, 128, 256), num_classes=7)
    assert spec_to_name(model.spec) == "qlnet26n_eq5_nows_x6_hardball_all"


@pytest.mark.parametrize("field,value,allowed", [
    ("form", "eq9", "eq3, eq4"),
    ("act", "gelu", "none, relu"),
    ("act_at", "mid", "ds, all, none"),
    ("expansion", 0, ">= 1"),
    ("stem_width", 0, "positive integer"),
    ("stem_width", 32.0, "positive integer"),
])
def test_invalid_spec_names_field(field, value, allowed):
    with pytest.raises(ValueError, match=f"ArchSpec.{field}=.*{allowed}"):
        ArchSpec(**{field: value})


def test_invalid_combinations():
    with pytest.raises(ValueError, match="act and act_at"):
        ArchSpec(act="none", act_at="ds")
    with pytest.raises(ValueError, match="even"):
        ArchSpec(form="glb", expansion=3)
    with pytest.raises(ValueError, match="unknown size"):
        name_to_spec("qlnet99_eq3_softball_ds")


def test_timm_api():
    model = timm.create_model("qlnet26n_eq4_softball_ds", num_classes=5)
    assert isinstance(model, QLNet)
    x = torch.randn(1, 3, 64, 64)
    feats = model.forward_features(x)
    assert feats.shape[1] == model.num_features == 256
    assert model.forward_head(feats, pre_logits=True).shape == (1, 256)
    model.reset_classifier(3)
    assert model(x).shape == (1, 3) and model.spec.num_classes == 3
    assert model.pretrained_cfg["first_conv"] == "stem.conv"
    assert model.default_cfg["classifier"] == "fc"


def test_blocks_start_as_identity():
    """Zero-initialised last BN: at init each block is act(shortcut(u))."""
    model = timm.create_model("qlnet26n", act="none", act_at="none", num_classes=4).eval()
    block = model.stages[0][1]
    u = torch.randn(2, 32, 8, 8)
    torch.testing.assert_close(block(u), u)
