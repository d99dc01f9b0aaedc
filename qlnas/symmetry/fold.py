"""BatchNorm folding (eval mode) and random BN statistics for meaningful checks.

Folding keeps every module, so the model still loads under its timm name: each BN becomes an
affine map with identity statistics (running_mean 0, running_var 1 - eps), and where it
follows a conv that writes a stream its scale moves into the conv's rows, leaving only the
bias: a transform T that mixes stream channels then acts on the conv rows and on that bias.
The BN after the 3x3 depthwise conv keeps its per-channel scale (a shared 3x3 kernel cannot
absorb it); it lies inside the block and never mixes stream channels. The BN after the
coefficient conv (``bn_coef``) gives its scale to that conv's rows and keeps its bias: it acts
on the block's internal channels, which a change of variables on the stream only relabels.
"""

from __future__ import annotations

import torch
from torch import nn

from qlnas.models.blocks import Eq4Block, Shortcut
from qlnas.models.net import QLNet


@torch.no_grad()
def affine_bn(bn: nn.BatchNorm2d) -> None:
    """Rewrite an eval-mode BN as scale * x + bias with identity running statistics."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bn.bias.copy_(bn.bias - scale * bn.running_mean)
    bn.weight.copy_(scale)
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0 - bn.eps)


@torch.no_grad()
def fold_scale(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Move an affine BN's scale into the output channels (rows) of the conv before it."""
    conv.weight.mul_(bn.weight.reshape(-1, 1, 1, 1))
    bn.weight.fill_(1.0)


def writer_pairs(model: QLNet) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """(conv, bn) pairs whose output is (a term of) a residual stream."""
    pairs = [(model.stem.conv, model.stem.bn)]
    if model.stem.lin_conv is not None:
        pairs.append((model.stem.lin_conv, model.stem.lin_bn))
    for stage in model.stages:
        for block in stage:
            if isinstance(block.shortcut, Shortcut):
                pairs.append((block.shortcut.conv, block.shortcut.bn))
            if isinstance(block, Eq4Block):
                # bn_out follows the product C(u) * A(.): its scale goes into C.
                pairs.append((block.coef, block.bn_out))
            elif hasattr(block, "bn_out"):
                pairs.append((block.proj, block.bn_out))
    return pairs


@torch.no_grad()
def fold_bn(model: QLNet) -> QLNet:
    """Fold every BN in place (see the module docstring); the function is unchanged in eval."""
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            affine_bn(mod)
    for mod in model.modules():
        if isinstance(getattr(mod, "bn_coef", None), nn.BatchNorm2d):
            fold_scale(mod.coef, mod.bn_coef)  # rows of coef: its bias stays in bn_coef
            if isinstance(mod, Eq4Block):  # bn_out's scale goes into coef below: and its bias
                mod.bn_coef.bias.mul_(mod.bn_out.weight)
    for conv, bn in writer_pairs(model):
        fold_scale(conv, bn)
    return model


@torch.no_grad()
def randomize_bn(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Random BN statistics and affine parameters, in place.

    A fresh model's zero-initialised last BN makes every block the identity (and its unit
    statistics hide what folding does), so checks on fresh models randomise them first. The
    last BN of each block gets a small scale so the products inside the blocks stay tame
    through the depth of the network; the BNs that write a stream get a larger one, so the
    streams reach the radius of hardball/softball and the activations are really nonlinear.
    """
    last = {id(m.last_bn()) for m in model.modules() if hasattr(m, "last_bn")}
    writers = {id(bn) for _, bn in writer_pairs(model)} - last if isinstance(model, QLNet) \
        else set()
    for mod in model.modules():
        if not isinstance(mod, nn.BatchNorm2d):
            continue
        c = mod.num_features

        def rand(lo: float, hi: float, c: int = c, ref: torch.Tensor = mod.weight) -> torch.Tensor:
            u = torch.rand(c, generator=gen, dtype=torch.float64)
            return (lo + (hi - lo) * u).to(ref.dtype)

        sign = torch.randint(0, 2, (c,), generator=gen).to(mod.weight.dtype) * 2 - 1
        if id(mod) in last:
            scale = rand(0.1, 0.3)
        elif id(mod) in writers:  # streams a little beyond the radius R = sqrt(n)
            scale = rand(1.0, 2.0)
        else:
            scale = rand(0.5, 1.5)
        mod.weight.copy_(scale * sign)
        mod.bias.copy_(rand(-0.2, 0.2))
        mod.running_mean.copy_(rand(-0.2, 0.2))
        mod.running_var.copy_(rand(0.5, 2.0))
    return model
