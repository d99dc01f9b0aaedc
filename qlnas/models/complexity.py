"""Parameter and multiply-accumulate counts, and the paper's Table 1 comparison."""

from __future__ import annotations

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Table 1 of the paper (ImageNet-100 heads): model -> parameters in millions.
TABLE1: dict[str, tuple[str, float]] = {
    "resnet50": ("ResNet50", 23.7),
    "qlnet50_eq3_relu_all": ("Eq.(3) relu@all", 8.61),
    "qlnet50_eq3_hardtanh_ds": ("Eq.(3) hardtanh@ds", 8.61),
    "qlnet50_eq3_hardball_ds": ("Eq.(3) hardball@ds", 8.61),
    "qlnet50_eq3_softball_ds": ("Eq.(3) softball@ds", 8.61),
    "qlnet50_eq3_nows_softball_ds": ("Eq.(3) no ws softball@ds", 8.73),
    "qlnet50_eq3_nows_x6_softball_ds": ("Eq.(3) no ws x6 softball@ds", 13.0),
    "qlnet50_eq4_softball_ds": ("Eq.(4) softball@ds", 5.70),
    "qlnet50_eq5_softball_ds": ("Eq.(5) softball@ds", 4.26),
    "qlnet50_eq6_softball_ds": ("Eq.(6) softball@ds", 5.61),
    "qlnet50_eq7_nows_x6_softball_ds": ("Eq.(7) no ws x6 softball@ds", 13.0),
    "mobilenetv3_large_100": ("MobileNetV3-large", 4.33),
}


def provenance(name: str) -> str:
    """Where a registered model comes from, in a few words."""
    from qlnas.models.spec import PRESETS, SIZES

    if name in PRESETS:
        return PRESETS[name].source
    if name in SIZES:
        return "generic size entry (spec fields as kwargs)"
    if "_glb_" in name:
        return "GL block: the block with the paper's GL(n) symmetry (qlnas)"
    if name in TABLE1:
        return f"paper, Table 1: {TABLE1[name][0]}"
    return "paper's block equations, another activation or placement"


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, resolution: int = 224) -> int:
    """Multiply-accumulates of one forward pass at batch 1, counted by torch's FLOP counter.

    Convs and matmuls are counted (FLOPs / 2); element-wise products and norms are not.
    """
    was_training = model.training
    model.eval()
    x = torch.zeros(1, 3, resolution, resolution)
    with FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2


def model_row(name: str, num_classes: int, resolution: int = 224) -> dict:
    model = timm.create_model(name, num_classes=num_classes)
    return {
        "model": name,
        "params_m": count_params(model) / 1e6,
        "gmacs": count_macs(model, resolution) / 1e9,
    }


def table1_rows() -> list[dict]:
    """Each Table 1 row at 100 classes: the paper's count, ours, and the relative error."""
    rows = []
    for name, (label, paper_m) in TABLE1.items():
        row = model_row(name, num_classes=100)
        ours = row["params_m"]
        error = 100 * (ours - paper_m) / paper_m
        rows.append({
            "row": label, "model": name, "paper_m": paper_m, "ours_m": round(ours, 3),
            "params": int(round(ours * 1e6)), "error_pct": round(error, 2),
            "gmacs": round(row["gmacs"], 3),
        })
    return rows
