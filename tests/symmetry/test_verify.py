"""Every form and activation: the derived group is exact; GL and O(n) break where they should.

The measured numbers go to the README's table (qlnas/symmetry/README_SECTION.md).
"""

import pytest
import timm
import torch

from qlnas.models.spec import ACTS
from qlnas.symmetry.streams import find_streams
from qlnas.symmetry.transform import apply
from qlnas.symmetry.verify import EXACT, sample_transforms, verify
from tests.symmetry.helpers import SMALL, max_rel_diff, small_model

FACTORISED = ("eq3", "eq4", "eq5", "eq6", "eq7")
FORMS = FACTORISED + ("glb",)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("form", FORMS)
def test_derived_group_is_exact(form, act):
    model = small_model(form, act)
    # One stream at a time for one activation per form (the README table), all at once always.
    rows = verify(model, "auto", trials=1, size=32, batch=1, per_stream=act == "softball")
    assert rows[-1].stream == "all"
    for r in rows:
        assert r.change < EXACT, r
    if form == "glb" and act in ("none", "hardball", "softball"):
        assert set(rows[-1].group.split(",")[1:]) == {"gl" if act == "none" else "o"}


@pytest.mark.parametrize("group", ["gl", "o"])
@pytest.mark.parametrize("form", FACTORISED)
def test_gl_and_o_break_on_factorised_forms(form, group):
    model = small_model(form, "softball" if group == "o" else "none")
    rows = verify(model, group, trials=1, size=32, batch=1, per_stream=form in ("eq3", "eq5"))
    for r in rows:
        assert r.change > 1e-3, r
        assert not r.expected


def test_gl_breaks_with_a_radial_activation_on_the_gl_block():
    rows = verify(small_model("glb", "hardball"), "gl", trials=1, size=32, batch=1)
    stages = [r for r in rows if r.stream.startswith("stage")]
    assert all(r.change > 1e-3 for r in stages)


def test_apply_keeps_architecture_and_state_dict_keys():
    model = small_model("eq3", "softball", weight_sharing=False)
    groups = {s.name: s.group for s in find_streams(model)}
    t = sample_transforms(model, groups, torch.Generator().manual_seed(3))
    out = apply(model, t)
    assert max_rel_diff(out, model) > 1e-2  # the weights really moved
    reloaded = timm.create_model("qlnet26n", form="eq3", act="softball", act_at="all",
                                 weight_sharing=False, **SMALL).double().eval()
    reloaded.load_state_dict(out.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        assert torch.allclose(reloaded(x), ref, rtol=0, atol=1e-12 * float(ref.abs().max()))


def test_apply_rejects_unknown_streams():
    model = small_model("glb", "none")
    with pytest.raises(ValueError, match="unknown stream"):
        apply(model, {"stage9": torch.eye(3)})
