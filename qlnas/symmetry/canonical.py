"""`canonicalize`: one representative of a model's orbit under its stream groups.

Two models that differ by a group element come out the same, so independently trained
models can be compared channel by channel.

- GL(n) and O(n) streams: the stream's last writer (the proj A of the stage's last block,
  or the stem's linear 1x1) is put in normal form: A = [I, *] (GL) or A upper triangular with
  a positive diagonal (O(n), QR).
- Monomial groups: per channel, the weights that read it scale as 1/d and the biases
  written into it as d; scalings (where allowed) balance the two norms, signs (where
  allowed) make the summed bias positive, and channels are sorted by the balanced norm
  sqrt(|readers| |biases|), largest first. Eq.(5) sorts blocks of channels together, as its
  permutations are tied across streams.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from qlnas.symmetry.compress import Target, enforce
from qlnas.symmetry.fold import fold_bn
from qlnas.symmetry.groups import has_scaling, has_sign, monomial_matrix
from qlnas.symmetry.reduce import row_reduce
from qlnas.symmetry.streams import (
    Stream,
    block_links,
    check_model,
    eq5_atoms,
    find_streams,
    stem_stream,
    stream_widths,
)
from qlnas.symmetry.transform import apply

CONTINUOUS = ("gl", "o")


def writer_module(model: nn.Module, stream: str) -> str:
    """The 1x1 conv whose normal form fixes a GL/O stream: its last writer."""
    if stream == "stem":
        return "stem.lin_conv"
    s = int(stream.removeprefix("stage")) - 1
    return f"stages.{s}.{model.spec.depths[s] - 1}.proj"


def reader_weights(model: nn.Module, stream: str) -> torch.Tensor:
    """Per channel (rows), the folded weights that read it and nothing else of the stream.

    They scale as 1/d_j under u_j -> d_j u_j, and their other index only moves by
    permutations: the columns of coef (of the BN after the 3x3 copies for Eq.(4), whose coef
    also carries the next stream's scaling) and of the head.
    """
    parts = []
    for link in block_links(model):
        if link.reads != stream:
            continue
        block = link.block
        if block.form == "eq4":
            parts.append(block.bn_dw.weight.reshape(block.n, block.k))
        else:
            parts.append(block.coef.weight[:, :, 0, 0].T)
    if stream == list(stream_widths(model))[-1] and isinstance(model.fc, nn.Linear):
        parts.append(model.fc.weight.T)
    return torch.cat(parts, dim=1)


def writer_biases(model: nn.Module, stream: str) -> torch.Tensor:
    """Per channel (rows), the folded biases written into it: they scale as d_j."""
    stem = model.stem
    parts = []
    if stream == stem_stream(model):
        parts.append((stem.lin_bn if stem.lin_conv is not None else stem.bn).bias)
    for link in block_links(model):
        if link.writes != stream:
            continue
        block = link.block
        if not isinstance(block.shortcut, nn.Identity):
            parts.append(block.shortcut.bn.bias)
        if hasattr(block, "bn_out"):
            parts.append(block.bn_out.bias)
        else:  # Eq.(5): the biases of the copies summed into each channel
            parts.extend(block.bn_dw.bias.reshape(block.m, -1).T)
    return torch.stack(parts, dim=1)


def _gauge(folded: nn.Module, s: Stream) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, key): the diagonal that balances reader and writer norms and makes the summed
    bias positive (as far as the group allows), and the invariant norm to sort by."""
    r = torch.linalg.vector_norm(reader_weights(folded, s.name), dim=1)
    c = writer_biases(folded, s.name)
    cn = torch.linalg.vector_norm(c, dim=1)
    d = torch.ones(s.width, dtype=torch.float64)
    if has_scaling(s.group):
        ok = (r > 0) & (cn > 0)
        d = torch.where(ok, torch.sqrt(r / torch.where(ok, cn, 1.0)), 1.0)
    if has_sign(s.group):
        d = d * torch.where(c.sum(1) < 0, -1.0, 1.0)
    return d, torch.sqrt(r * cn)


def _sort_perms(model: nn.Module, keys: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per monomial stream, perm[j] = new place of channel j (largest key first)."""
    perms = {}
    if keys and find_streams(model)[0].tied:
        atoms = eq5_atoms(model)
        key = sum(k.reshape(atoms, -1).sum(1) for k in keys.values())
        order = torch.argsort(key, descending=True)
        atom_perm = torch.empty_like(order)
        atom_perm[order] = torch.arange(atoms)
        for name, k in keys.items():
            size = len(k) // atoms
            perms[name] = (atom_perm.unsqueeze(1) * size + torch.arange(size)).reshape(-1)
        return perms
    for name, key in keys.items():
        order = torch.argsort(key, descending=True)
        perm = torch.empty_like(order)
        perm[order] = torch.arange(len(order))
        perms[name] = perm
    return perms


@torch.no_grad()
def canonicalize(model: nn.Module) -> nn.Module:
    """A float64 copy of `model` (BN folded, eval) in the canonical gauge of its groups."""
    model = copy.deepcopy(check_model(model)).to(torch.float64).eval()
    folded = fold_bn(copy.deepcopy(model))
    transforms, scales, keys, targets = {}, {}, {}, []
    for s in find_streams(model):
        if s.group in CONTINUOUS:
            module = writer_module(folded, s.name)
            red = row_reduce(folded.get_submodule(module).weight[:, :, 0, 0], s.group)
            transforms[s.name] = red.g
            targets.append(Target(module, red.zeros, red.ones))
        else:
            scales[s.name], keys[s.name] = _gauge(folded, s)
    perms = _sort_perms(folded, keys)
    for name, d in scales.items():
        transforms[name] = monomial_matrix(perms[name], d)
    out = apply(model, transforms)
    enforce(out, targets)  # the normal forms' zeros and ones, exactly
    return out
