"""Streams and the groups derived from the spec (docs/architecture.md §5)."""

import pytest
import timm
import torch

import qlnas  # noqa: F401
from qlnas.symmetry.streams import eq5_atoms, find_streams, tied_perm

DERIVED = {
    "qlnet50_glb_softball_ds": {"stage1": "o", "stage2": "o", "stage3": "o", "stage4": "o"},
    "qlnet50_glb_none": {"stage1": "gl", "stage2": "gl", "stage3": "gl", "stage4": "gl"},
    # stage 1 sits behind the stem's ReLU + max-pool: positive scalings, and softball: signs.
    "qlnet50_eq3_softball_ds": {"stage1": "perm", "stage2": "signed_perm",
                                "stage3": "signed_perm", "stage4": "signed_perm"},
    "qlnet50_eq3_relu_all": dict.fromkeys(["stage1", "stage2", "stage3", "stage4"],
                                          "perm_pos_scale"),
    "qlnet26n_glb_none": {"stem": "gl", "stage1": "gl", "stage2": "gl", "stage3": "gl",
                          "stage4": "gl"},
    "qlnet26n_eq4_softball_ds": {"stem": "perm_pos_scale", "stage1": "signed_perm",
                                 "stage2": "signed_perm", "stage3": "signed_perm",
                                 "stage4": "signed_perm"},
}


@pytest.mark.parametrize("name", sorted(DERIVED))
def test_derived_groups(name):
    streams = find_streams(timm.create_model(name))
    assert {s.name: s.group for s in streams} == DERIVED[name]


def test_factorised_nonlinear_stem_without_activation_is_monomial():
    model = timm.create_model("qlnet26n", form="eq6", act="none", act_at="none")
    groups = {s.name: s.group for s in find_streams(model)}
    assert groups == {"stem": "perm_pos_scale", "stage1": "monomial", "stage2": "monomial",
                      "stage3": "monomial", "stage4": "monomial"}


def test_readers_and_writers():
    model = timm.create_model("qlnet26n_glb_none")
    stage2 = next(s for s in find_streams(model) if s.name == "stage2")
    assert "stages.1.0.shortcut.conv" in stage2.writers
    assert "stages.1.1.proj" in stage2.writers
    assert "stages.2.0.coef" in stage2.readers and "stages.2.0.shortcut.conv" in stage2.readers
    last = find_streams(model)[-1]
    assert "fc" in last.readers


def test_eq5_permutations_are_tied_across_stages():
    model = timm.create_model("qlnet26n_eq5_softball_ds")  # stem 64 -> 32 -> 64 -> ... 256
    assert all(s.tied for s in find_streams(model))
    atoms = eq5_atoms(model)
    assert atoms == 32
    # Channel j of stage 1 feeds channels 2j, 2j+1 of stage 2: they move together.
    atom_perm = torch.randperm(atoms)
    p1, p2 = tied_perm(atom_perm, 32), tied_perm(atom_perm, 64)
    for j in range(32):
        assert p2[2 * j] == 2 * p1[j] and p2[2 * j + 1] == 2 * p1[j] + 1
