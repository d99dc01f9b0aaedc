"""Lossless compression: choose group elements on the streams that make weights exactly zero.

Only streams that carry GL(n) or O(n) (the GL block, docs/architecture.md §6) can
do it; monomial groups move weights but never zero them. Strategies:

- ``skip``: the skip projections S (1x1, stride 2) between consecutive streams: SVD where
  both streams are free (S becomes diagonal), QR on the side still free, [I; 0] for GL;
- ``last``: each stream's last writer, the proj A of the stage's last block: QR (O(n), A
  becomes triangular) or the inverse of its leading block (GL, A = [I, *]);
- ``auto``: whichever makes more zeros.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from qlnas.errors import UserError
from qlnas.models.blocks import Shortcut
from qlnas.symmetry.fold import fold_bn
from qlnas.symmetry.reduce import col_reduce, row_reduce, svd_reduce
from qlnas.symmetry.streams import block_links, check_model, find_streams
from qlnas.symmetry.transform import apply

STRATEGIES = ("auto", "skip", "last")
ZERO_TOLERANCE = 1e-9
"""Entries zero by construction must be below this (relative to the matrix) before being
set to exactly 0; anything larger is a bug, not rounding."""


log = logging.getLogger(__name__)


@dataclass
class Target:
    """A 1x1 conv of the transformed model and its entries that are 0 and 1 by construction."""

    module: str
    zeros: torch.Tensor
    ones: torch.Tensor


@dataclass
class Plan:
    strategy: str
    transforms: dict[str, torch.Tensor] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(int(t.zeros.sum()) for t in self.targets)


@dataclass
class CompressResult:
    model: nn.Module
    plan: Plan
    zeros_before: int
    zeros_after: int


def _mat(model: nn.Module, name: str) -> torch.Tensor:
    return model.get_submodule(name).weight[:, :, 0, 0].detach().to(torch.float64)


def free_streams(model: nn.Module) -> dict[str, str]:
    """Streams whose group is continuous (GL or O), by name."""
    return {s.name: s.group for s in find_streams(model) if s.group in ("gl", "o")}


def plan_last(folded: nn.Module, free: dict[str, str]) -> Plan:
    plan = Plan("last")
    depths = folded.spec.depths
    for name, group in free.items():
        if name == "stem":
            module = "stem.lin_conv"
        else:
            s = int(name.removeprefix("stage")) - 1
            module = f"stages.{s}.{depths[s] - 1}.proj"
        try:
            red = row_reduce(_mat(folded, module), group, pivot=True)
        except torch.linalg.LinAlgError:  # rank-deficient (e.g. an untrained, zero BN scale)
            log.warning("%s is rank-deficient: stream %s left as it is", module, name)
            continue
        plan.transforms[name] = red.g
        plan.targets.append(Target(module, red.zeros, red.ones))
    return plan


def plan_skip(folded: nn.Module, free: dict[str, str], backward: bool) -> Plan:
    plan = Plan("skip")
    fixed = plan.transforms
    links = [lk for lk in block_links(folded) if isinstance(lk.block.shortcut, Shortcut)]
    for link in reversed(links) if backward else links:
        module = f"{link.name}.shortcut.conv"
        s = _mat(folded, module)
        out_free = link.writes in free and link.writes not in fixed
        in_free = link.reads in free and link.reads not in fixed
        if out_free and in_free:
            fixed[link.writes], fixed[link.reads], zeros = svd_reduce(s)
            plan.targets.append(Target(module, zeros, torch.zeros_like(zeros)))
            continue
        try:
            if out_free:
                t_in = fixed.get(link.reads)
                red = row_reduce(s if t_in is None else s @ torch.linalg.inv(t_in),
                                 free[link.writes], pivot=True)
                fixed[link.writes] = red.g
            elif in_free:
                t_out = fixed.get(link.writes)
                red = col_reduce(s if t_out is None else t_out @ s, free[link.reads],
                                 pivot=True)
                fixed[link.reads] = red.g
            else:
                continue
        except torch.linalg.LinAlgError:
            log.warning("%s is rank-deficient: left as it is", module)
            continue
        plan.targets.append(Target(module, red.zeros, red.ones))
    return plan


def make_plan(folded: nn.Module, strategy: str, free: dict[str, str]) -> Plan:
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy {strategy!r} is unknown; expected one of "
                        f"{', '.join(STRATEGIES)}")
    plans = []
    if strategy in ("auto", "skip"):
        plans += [plan_skip(folded, free, backward=b) for b in (True, False)]
    if strategy in ("auto", "last"):
        plans.append(plan_last(folded, free))
    return max(plans, key=lambda p: p.count)


@torch.no_grad()
def enforce(model: nn.Module, targets: list[Target]) -> None:
    """Set the entries that are 0 (and 1) by construction exactly, after checking them."""
    for t in targets:
        w = model.get_submodule(t.module).weight[:, :, 0, 0]
        scale = float(w.abs().max())
        if t.zeros.any():
            err = float(w[t.zeros].abs().max()) / scale
            if err > ZERO_TOLERANCE:
                raise RuntimeError(f"{t.module}: entries meant to be zero reach {err:.1e}")
            w[t.zeros] = 0.0
        if t.ones.any():
            err = float((w[t.ones] - 1).abs().max())
            if err > ZERO_TOLERANCE * max(scale, 1.0):
                raise RuntimeError(f"{t.module}: entries meant to be one are off by {err:.1e}")
            w[t.ones] = 1.0


def count_zeros(model: nn.Module) -> int:
    """Exact zeros among the model's parameters (not its buffers)."""
    return sum(int((p == 0).sum()) for p in model.parameters())


def sparse_bytes(model: nn.Module, value_bytes: int = 4) -> tuple[int, int]:
    """(dense, sparse) sizes of the parameters; sparse: a 1-bit mask plus the non-zero values,
    per tensor whichever of the two is smaller."""
    dense = sparse = 0
    for p in model.parameters():
        numel, nnz = p.numel(), int((p != 0).sum())
        d = numel * value_bytes
        dense += d
        sparse += min(d, nnz * value_bytes + math.ceil(numel / 8))
    return dense, sparse


def compress(model: nn.Module, strategy: str = "auto") -> CompressResult:
    """A float64 copy of `model` (BN folded, eval) with weights made exactly zero by the group.

    Raises UserError when no stream carries GL or O(n) (the factorised forms).
    """
    model = copy.deepcopy(check_model(model)).to(torch.float64).eval()
    free = free_streams(model)
    if not free:
        groups = sorted({s.group for s in find_streams(model)})
        raise UserError(
            f"form {model.spec.form} with act {model.spec.act}: its streams carry only "
            f"{', '.join(groups)} (monomial symmetries: permutations times scalings), which move "
            "weights but cannot make any zero; nothing compressed")
    folded = fold_bn(copy.deepcopy(model))
    plan = make_plan(folded, strategy, free)
    out = apply(model, plan.transforms)
    enforce(out, plan.targets)
    return CompressResult(out, plan, count_zeros(model), count_zeros(out))
