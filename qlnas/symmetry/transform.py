"""`apply`: change variables u -> T u on the residual streams of a QLNet.

After folding BN (eval mode), a conv that reads a stream takes T^-1 on its inputs, one that
writes it takes T on its outputs (and on the bias carried by its BN). Layers that read or
write a stream channel by channel (the 3x3 depthwise conv, the products of Eq.(4)-(7), the
copy sums of Eq.(5)) can only follow a monomial T: they get its permutation on their channel
copies, and its scaling goes into the affine BN after the 3x3 conv (or into the 1x1 conv of
the other factor). For any other T they are left as they are, which is exactly why GL and
O(n) break on the factorised forms.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from qlnas.models.blocks import Shortcut
from qlnas.models.net import QLNet
from qlnas.symmetry.fold import fold_bn
from qlnas.symmetry.groups import monomial_parts
from qlnas.symmetry.streams import block_links, check_model, stem_stream, stream_widths


@dataclass
class _Side:
    """T on one stream, its inverse and, when monomial, its permutation and scaling."""

    t: torch.Tensor
    inv: torch.Tensor
    perm: torch.Tensor | None
    scale: torch.Tensor | None

    @classmethod
    def of(cls, t: torch.Tensor, dtype: torch.dtype) -> _Side:
        mono = monomial_parts(t)
        if mono is None:
            inv = torch.linalg.inv(t.to(torch.float64))
            return cls(t.to(dtype), inv.to(dtype), None, None)
        perm, scale = mono
        inv = torch.zeros_like(t, dtype=torch.float64)
        inv[torch.arange(len(perm)), perm] = 1.0 / scale.to(torch.float64)
        return cls(t.to(dtype), inv.to(dtype), perm, scale.to(dtype))

    @property
    def mono(self) -> bool:
        return self.perm is not None


def _copies(perm: torch.Tensor, k: int) -> torch.Tensor:
    """Channel j*k + c goes where channel j goes: perm[j]*k + c."""
    return (perm.unsqueeze(1) * k + torch.arange(k)).reshape(-1)


def _place(x: torch.Tensor, idx: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Entry i of x (along dim) moves to position idx[i]."""
    out = torch.empty_like(x)
    if dim == 0:
        out[idx] = x
    else:
        out[:, idx] = x
    return out


def _mat(conv: nn.Conv2d) -> torch.Tensor:
    return conv.weight[:, :, 0, 0]


def _set_mat(conv: nn.Conv2d, m: torch.Tensor) -> None:
    conv.weight.copy_(m.reshape(conv.weight.shape))


def _rows(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,j...->i...", t, w)


def _internal(block: nn.Module, side: _Side) -> torch.Tensor | None:
    """Relabel the 3x3 copies of a monomial T's channels; scaling into bn_dw. Returns idx."""
    if not side.mono:
        return None
    q = _copies(side.perm, block.k)
    dw, bn = block.dw, block.bn_dw
    if not dw.shared:
        dw.weight.copy_(_place(dw.weight, q))
    bn.weight.copy_(_place(bn.weight / side.scale.repeat_interleave(block.k), q))
    bn.bias.copy_(_place(bn.bias, q))
    return q


def _shortcut(block: nn.Module, t_in: _Side, t_out: _Side) -> None:
    if isinstance(block.shortcut, Shortcut):
        conv, bn = block.shortcut.conv, block.shortcut.bn
        _set_mat(conv, t_out.t @ _mat(conv) @ t_in.inv)
        bn.bias.copy_(t_out.t @ bn.bias)


def _coef(block: nn.Module, t_in: _Side) -> torch.Tensor:
    """coef T^-1, with the bias of a folded ``bn_coef`` as one more column: the row operations
    below act on both."""
    coef = _mat(block.coef) @ t_in.inv
    if isinstance(block.bn_coef, nn.BatchNorm2d):
        coef = torch.cat([coef, block.bn_coef.bias.unsqueeze(1)], dim=1)
    return coef


def _set_coef(block: nn.Module, coef: torch.Tensor) -> None:
    n = block.coef.weight.shape[1]
    _set_mat(block.coef, coef[:, :n])
    if isinstance(block.bn_coef, nn.BatchNorm2d):
        block.bn_coef.bias.copy_(coef[:, n])


def _block(block: nn.Module, t_in: _Side, t_out: _Side) -> None:
    _shortcut(block, t_in, t_out)
    form = block.form
    coef = _coef(block, t_in)
    if form == "glb":
        _set_coef(block, coef)
        _set_mat(block.proj, t_out.t @ _mat(block.proj))
    elif form in ("eq3", "eq6", "eq7"):
        q = _internal(block, t_in)
        if q is not None:
            coef = _place(coef, t_in.perm if form == "eq6" else q)
        _set_coef(block, coef)
        proj = t_out.t @ _mat(block.proj)
        _set_mat(block.proj, proj if q is None else _place(proj, q, dim=1))
    elif form == "eq4":
        q = _internal(block, t_in)
        proj = _mat(block.proj) if q is None else _place(_mat(block.proj), q, dim=1)
        if t_out.mono:
            coef = _place(t_out.scale.unsqueeze(1) * coef, t_out.perm)
            proj = _place(proj, t_out.perm)
        else:
            coef = t_out.t @ coef
        _set_coef(block, coef)
        _set_mat(block.proj, proj)
    elif form == "eq5":
        _eq5(block, coef, t_in, t_out)
    else:
        raise ValueError(f"no transform rule for block form {form!r}")
    if hasattr(block, "bn_out"):
        block.bn_out.bias.copy_(t_out.t @ block.bn_out.bias)


def _eq5(block: nn.Module, coef: torch.Tensor, t_in: _Side, t_out: _Side) -> None:
    """Copies of channel j are summed into output channel (j*k + c) // g, g = k n / m."""
    kn = block.k * block.n
    g = kn // block.m
    old = torch.arange(kn)
    if t_in.mono and t_out.mono:
        q = _copies(t_in.perm, block.k)
        if bool((t_out.perm[old // g] == q // g).all()):
            e = t_out.scale[old // g]
            d = t_in.scale.repeat_interleave(block.k)
            dw, bn = block.dw, block.bn_dw
            if not dw.shared:
                dw.weight.copy_(_place(dw.weight, q))
            bn.weight.copy_(_place(bn.weight * e / d, q))
            bn.bias.copy_(_place(bn.bias * e, q))
            _set_coef(block, _place(coef, q))
            return
    q = _internal(block, t_in)
    _set_coef(block, coef if q is None else _place(coef, q))


@torch.no_grad()
def apply(model: nn.Module, transforms: Mapping[str, torch.Tensor]) -> QLNet:
    """A copy of `model` (BN folded, eval mode) with stream u -> T u for each given stream.

    `transforms` maps stream names (see `find_streams`) to invertible matrices; streams not
    named keep T = I. The result has the same architecture and state-dict keys; it computes
    the same function when every T lies in its stream's group, in float64 up to rounding.
    """
    model = check_model(model)
    widths = stream_widths(model)
    unknown = sorted(set(transforms) - set(widths))
    if unknown:
        raise ValueError(f"unknown stream(s) {', '.join(unknown)}; known: {', '.join(widths)}")
    out = copy.deepcopy(model).eval()
    fold_bn(out)
    dtype = out.fc.weight.dtype if isinstance(out.fc, nn.Linear) else out.stem.conv.weight.dtype
    sides = {}
    for name, n in widths.items():
        t = transforms.get(name)
        t = torch.eye(n, dtype=torch.float64) if t is None else t.detach().to("cpu")
        if t.shape != (n, n):
            raise ValueError(f"transform of stream {name} has shape {tuple(t.shape)}; "
                             f"expected ({n}, {n})")
        sides[name] = _Side.of(t, dtype)
    stem = out.stem
    t0 = sides[stem_stream(out)]
    if stem.lin_conv is not None:
        _set_mat(stem.lin_conv, t0.t @ _mat(stem.lin_conv))
        stem.lin_bn.bias.copy_(t0.t @ stem.lin_bn.bias)
    else:  # exact only for permutations with positive scalings (ReLU, max-pool)
        stem.conv.weight.copy_(_rows(t0.t, stem.conv.weight))
        stem.bn.bias.copy_(t0.t @ stem.bn.bias)
    for link in block_links(out):
        _block(link.block, sides[link.reads], sides[link.writes])
    if isinstance(out.fc, nn.Linear):
        out.fc.weight.copy_(out.fc.weight @ sides[list(widths)[-1]].inv)
    return out
