"""The group lattice and random elements."""

import pytest
import torch

from qlnas.symmetry.groups import (
    GROUPS,
    is_subgroup,
    meet,
    monomial_matrix,
    monomial_parts,
    random_element,
)


def test_meet_is_the_intersection():
    assert meet("gl", "o") == "o"
    assert meet("o", "monomial") == "signed_perm"
    assert meet("monomial", "perm_pos_scale") == "perm_pos_scale"
    assert meet("signed_perm", "perm_pos_scale") == "perm"
    assert meet("o", "perm_pos_scale") == "perm"
    for g in GROUPS:
        assert meet("gl", g) == g and meet(g, g) == g
        assert is_subgroup("perm", g)


@pytest.mark.parametrize("group", GROUPS)
def test_random_elements_lie_in_their_group(group):
    gen = torch.Generator().manual_seed(0)
    t = random_element(group, 12, gen)
    eye = torch.eye(12, dtype=torch.float64)
    parts = monomial_parts(t)
    if group in ("gl", "o"):
        assert parts is None  # a generic element mixes channels
        assert torch.linalg.cond(t) < 10
        if group == "o":
            assert torch.allclose(t @ t.T, eye, atol=1e-12)
        return
    perm, scale = parts
    assert torch.equal(monomial_matrix(perm, scale), t)
    assert sorted(perm.tolist()) == list(range(12))
    if group in ("perm", "signed_perm"):
        assert torch.equal(scale.abs(), torch.ones(12, dtype=torch.float64))
    if group in ("perm", "perm_pos_scale"):
        assert (scale > 0).all()
    if group in ("monomial", "perm_pos_scale"):
        assert (scale.abs() != 1).any()
