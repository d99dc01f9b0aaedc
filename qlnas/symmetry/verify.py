"""`verify`: apply random group elements to each stream and measure the output change."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from qlnas.errors import UserError
from qlnas.symmetry.groups import GROUPS, is_subgroup, random_element
from qlnas.symmetry.streams import Stream, check_model, eq5_atoms, find_streams, tied_perm
from qlnas.symmetry.transform import apply

EXACT = 1e-10
"""Largest relative output change (float64) that counts as an exact symmetry."""

MONOMIAL_GROUPS = ("monomial", "signed_perm", "perm_pos_scale", "perm")


@dataclass(frozen=True)
class VerifyRow:
    """One stream (or ``all`` streams at once) and the largest relative change measured."""

    stream: str
    width: int
    group: str
    derived: str
    change: float

    @property
    def holds(self) -> bool:
        return self.change < EXACT

    @property
    def expected(self) -> bool:
        """Whether the group tested is (a subgroup of) the one derived from the spec."""
        return all(is_subgroup(g, d) for g, d in zip(self.group.split(","),
                                                     self.derived.split(","), strict=True))


def groups_for(streams: list[Stream], group: str) -> dict[str, str]:
    """The group to test on each stream: the derived one (``auto``) or the one named."""
    if group != "auto" and group not in GROUPS:
        raise UserError(f"--group {group!r} is unknown; expected auto or one of "
                        f"{', '.join(GROUPS)}")
    return {s.name: s.group if group == "auto" else group for s in streams}


def sample_transforms(model: nn.Module, groups: dict[str, str], gen: torch.Generator,
                      only: str | None = None) -> dict[str, torch.Tensor]:
    """A random element of each stream's group (only of stream `only`, when given).

    Eq.(5) ties the permutations of all streams: a permutation of channel blocks is drawn
    once and every stream with a monomial group gets it (the scalings stay per stream).
    """
    model = check_model(model)
    streams = find_streams(model)
    atom_perm = None
    if streams[0].tied:
        atom_perm = torch.randperm(eq5_atoms(model), generator=gen)
    out = {}
    for s in streams:
        g = groups[s.name]
        perm = None
        if atom_perm is not None and g in MONOMIAL_GROUPS:
            perm = tied_perm(atom_perm, s.width)
        if only is None or s.name == only:
            out[s.name] = random_element(g, s.width, gen, perm)
        elif perm is not None:
            out[s.name] = random_element("perm", s.width, gen, perm)
    return out


def relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@torch.no_grad()
def verify(model: nn.Module, group: str = "auto", trials: int = 3, size: int = 64,
           batch: int = 2, seed: int = 0, progress: bool = False,
           per_stream: bool = True) -> list[VerifyRow]:
    """Per stream, then all at once: the largest relative output change over `trials`.

    Runs in float64 and eval mode on a copy of `model`, on random normal inputs.
    `per_stream=False` measures only the row of all streams at once.
    """
    if trials < 1:
        raise UserError(f"--trials {trials}: expected at least 1")
    model = check_model(model)
    model = copy.deepcopy(model).to(torch.float64).eval()
    streams = find_streams(model)
    groups = groups_for(streams, group)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=gen, dtype=torch.float64)
    ref = model(x)
    if not torch.isfinite(ref).all():
        raise UserError("the model's output on random inputs is not finite; cannot verify")
    targets = [s.name for s in streams] * per_stream + ["all"]
    bar = tqdm(total=len(targets) * trials, desc="verify", leave=False, disable=not progress)
    rows = []
    for name in targets:
        worst = 0.0
        for _ in range(trials):
            t = sample_transforms(model, groups, gen, only=None if name == "all" else name)
            worst = max(worst, relative_change(apply(model, t)(x), ref))
            bar.update()
        if name == "all":
            width = sum(s.width for s in streams)
            tested = ",".join(groups[s.name] for s in streams)
            derived = ",".join(s.group for s in streams)
        else:
            s = next(s for s in streams if s.name == name)
            width, tested, derived = s.width, groups[name], s.group
        rows.append(VerifyRow(name, width, tested, derived, worst))
    bar.close()
    return rows
