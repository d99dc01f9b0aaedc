"""Shared builders for the symmetry tests: small models with random BN statistics."""

from __future__ import annotations

import timm
import torch

import qlnas  # noqa: F401 - registers the models
from qlnas.symmetry.fold import randomize_bn

ACT_AT = {"none": "none", "relu": "all", "hardtanh": "ds", "hardball": "ds", "softball": "all"}


SMALL = dict(widths=(16, 32, 64, 128), stem_width=32, num_classes=10)
"""qlnet26n at half width (CPU time): stem 32 -> stage widths 16..128, so the stem output is a
stream of its own and Eq.(5) narrows (32 -> 16) as well as widens."""


def small_model(form: str, act: str, seed: int = 0, **kw) -> torch.nn.Module:
    """A half-width qlnet26n of a form and activation, random BN statistics, float64, eval."""
    torch.manual_seed(seed)
    model = timm.create_model("qlnet26n", form=form, act=act, act_at=ACT_AT[act],
                              **{**SMALL, **kw})
    randomize_bn(model, torch.Generator().manual_seed(seed))
    return model.to(torch.float64).eval()


def preset(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=100)
    randomize_bn(model, torch.Generator().manual_seed(seed))
    return model.eval()


def max_rel_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Largest difference between two state dicts, relative to each tensor's scale."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    worst = 0.0
    for k, va in sa.items():
        if va.is_floating_point():
            va, vb = va.double(), sb[k].double()
            scale = max(float(va.abs().max()), 1e-300)
            worst = max(worst, float((va - vb).abs().max()) / scale)
    return worst
