"""`qlnet50_liu2023`: the authors' published network as one more ArchSpec, and the new fields."""

import json

import pytest
import timm
import torch

import qlnas  # noqa: F401 - registers the models
from qlnas.models import ArchSpec, name_to_spec, spec_to_name
from qlnas.models.complexity import count_params, provenance
from qlnas.models.convert import convert_state
from qlnas.models.spec import PRESETS
from qlnas.symmetry.verify import relative_change
from tests.models.liu2023_layout import TheirNet

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_parameter_count_is_theirs():
    ours = timm.create_model("qlnet50_liu2023", num_classes=100)
    assert count_params(ours) == count_params(TheirNet(100)) == 9_531_940


def test_registered_named_and_listed_with_provenance():
    assert "qlnet50_liu2023" in timm.list_models("qlnet*")
    spec = name_to_spec("qlnet50_liu2023", num_classes=100)
    assert spec == PRESETS["qlnet50_liu2023"].spec.replace(num_classes=100)
    assert spec_to_name(spec) == "qlnet50_liu2023"
    assert "ConvNets-PDE-perspective" in provenance("qlnet50_liu2023")


def test_block_widths_follow_the_width_each_block_reads():
    model = timm.create_model("qlnet50_liu2023", num_classes=0)
    # w = 4n up to 128 channels read, else 2n: coef n -> 2w, dw w -> 2w, proj 2w -> m.
    for s, stage in enumerate(model.stages):
        for b, block in enumerate(stage):
            n = block.coef.in_channels
            w = (4 if n <= 128 else 2) * n
            assert block.coef.out_channels == 2 * w, (s, b)
            assert tuple(block.dw.weight.shape) == (2 * w, 1, 3, 3), (s, b)
            assert block.proj.in_channels == 2 * w
    assert model.stages[2][0].coef.in_channels == 128 and model.stages[2][0].k == 8


def test_hardball_after_each_projection_and_before_pooling():
    model = timm.create_model("qlnet50_liu2023")
    acts = {(s, b): type(block.act).__name__ for s, stage in enumerate(model.stages)
            for b, block in enumerate(stage)}
    balls = sorted(k for k, v in acts.items() if v == "HardBall")
    assert balls == [(1, 0), (2, 0), (3, 0), (3, 2)]
    radii = [model.stages[s][b].act.radius ** 2 for s, b in balls]
    assert radii == pytest.approx([128, 256, 512, 512])


def test_converted_logits_match_theirs_in_float64(theirs):
    ours = convert_state(theirs.state_dict()).eval()
    assert ours.fc.weight.dtype == torch.float64 and ours.num_classes == 100
    clipped = []
    hooks = [theirs.get_submodule(f"layer{s}.0").register_forward_hook(
        lambda mod, inp, out: clipped.append(_clip_fraction(out, mod.radius_sq)))
        for s in (2, 3, 4)]
    try:
        with torch.no_grad():
            want, got = theirs(X), ours(X)
    finally:
        for h in hooks:
            h.remove()
    assert any(0 < c < 1 for c in clipped), clipped  # the hardballs really act
    assert float(want.std()) > 0.1
    assert relative_change(got, want) < 1e-9


def _clip_fraction(out: torch.Tensor, radius_sq: float) -> float:
    norm = out.pow(2).sum(1).sqrt()
    return float((norm > radius_sq ** 0.5 * (1 - 1e-9)).double().mean())


def test_spec_round_trips_the_new_fields():
    spec = PRESETS["qlnet50_liu2023"].spec
    d = spec.to_dict()
    assert d["expansion"] == [8, 8, 4, 4] and d["coef_bn"] is True and d["act_last"] is True
    assert d["act_at"] == "proj"
    assert ArchSpec.from_dict(d) == spec
    assert ArchSpec.from_dict(json.loads(json.dumps(d))) == spec
    assert timm.create_model("qlnet26n", **{k: v for k, v in d.items()
                                            if k not in ("widths", "depths")}).spec \
        == spec.replace(depths=(2, 2, 2, 2), widths=(32, 64, 128, 256))


def test_expansion_per_stage_validation():
    assert ArchSpec(expansion=(4, 4, 4, 4)).expansion == 4  # equal entries: the int
    assert ArchSpec(expansion=[6, 6, 4, 4]).expansions == (6, 6, 4, 4)
    with pytest.raises(ValueError, match="one per stage"):
        ArchSpec(expansion=(4, 4))
    with pytest.raises(ValueError, match="even"):
        ArchSpec(form="glb", expansion=(8, 8, 4, 3))
    with pytest.raises(ValueError, match=r"ArchSpec.expansion=.*>= 1"):
        ArchSpec(expansion=(4, 0, 4, 4))


def test_new_fields_validation():
    with pytest.raises(ValueError, match="act_last=True with act='none'"):
        ArchSpec(act="none", act_at="none", act_last=True)
    with pytest.raises(ValueError, match="coef_bn=1; expected a bool"):
        ArchSpec(coef_bn=1)
    with pytest.raises(ValueError, match="allowed: ds, all, none, proj"):
        ArchSpec(act_at="mid")


def test_proj_placement_and_act_last_on_another_form():
    # Stem 64 -> stage 1 of 64: its first block keeps width and stride, so proj skips it.
    model = timm.create_model("qlnet26", form="eq3", act="softball", act_at="proj",
                              act_last=True, coef_bn=True)
    acts = [type(b.act).__name__ for stage in model.stages for b in stage]
    assert acts == ["Identity", "Identity", "SoftBall", "Identity", "SoftBall", "Identity",
                    "SoftBall", "SoftBall"]
    with pytest.raises(ValueError, match="no preset name"):
        spec_to_name(model.spec)


@pytest.mark.parametrize("form", ["eq3", "eq4", "eq5", "eq6", "eq7", "glb"])
def test_coef_bn_forward_backward_and_fuse(form):
    from qlnas.models import fuse
    from qlnas.symmetry.fold import randomize_bn

    torch.manual_seed(0)
    model = timm.create_model("qlnet26n", form=form, act="softball", coef_bn=True,
                              num_classes=10)
    assert all(isinstance(b.bn_coef, torch.nn.BatchNorm2d)
               for stage in model.stages for b in stage)
    randomize_bn(model, torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 64, 64)
    model(x).logsumexp(1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model = model.double().eval()
    with torch.no_grad():
        assert relative_change(fuse(model)(x.double()), model(x.double())) < 1e-10
