"""Inference-time BN folding: `fuse(model)` -> an equivalent eval-mode copy without BN layers.

Each BN that follows a conv becomes that conv's scale and bias; a BN after an element-wise
product (Eq.(4)'s ``bn_out``) is folded into one factor of the product plus a bias added after
it. The shared 3x3 kernel turns into a per-channel one (the BN scales differ per channel), so
the fused model is for inference only: its state_dict is not the trained model's.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from qlnas.models.blocks import Eq4Block, QLBlock, Shortcut
from qlnas.models.layers import DepthwiseConv3x3, FoldedDepthwise
from qlnas.models.net import QLNet, Stem


class ChannelBias(nn.Module):
    """Adds a per-channel bias: what is left of a BN whose scale was folded elsewhere."""

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias.view(1, -1, 1, 1)


def bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) with bn(x) = s x + t per channel, from the running statistics."""
    s = bn.running_var.add(bn.eps).rsqrt()
    if bn.weight is not None:
        s = s * bn.weight
    t = -bn.running_mean * s
    if bn.bias is not None:
        t = t + bn.bias
    return s, t


def _conv(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Conv2d | None = None, *,
          stride: int = 1, padding: int = 0, groups: int = 1) -> nn.Conv2d:
    if like is not None:
        stride, padding, groups = like.stride, like.padding, like.groups
    out_ch, in_per_group, kh, kw = weight.shape
    # A 3x3 depthwise conv with a channel multiplier (the blocks' dw) gets the native kernel.
    multiplier = in_per_group == 1 and out_ch > groups and (kh, kw) == (3, 3)
    cls = FoldedDepthwise if multiplier and tuple(_pair(padding)) == (1, 1) else nn.Conv2d
    conv = cls(in_per_group * groups, out_ch, (kh, kw), stride=stride, padding=padding,
                     groups=groups, bias=bias is not None)
    conv = conv.to(device=weight.device, dtype=weight.dtype)
    conv.weight.data.copy_(weight)
    if bias is not None:
        conv.bias.data.copy_(bias)
    conv.requires_grad_(False)
    return conv


def fold_conv_bn(conv: nn.Conv2d | DepthwiseConv3x3, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """One conv with bias equal to bn(conv(x)) in eval mode."""
    s, t = bn_scale_shift(bn)
    if isinstance(conv, DepthwiseConv3x3):
        weight = conv.full_weight()
        groups = conv.channels if conv.expand else conv.channels * conv.k
        base = _conv(weight, None, stride=conv.stride, padding=1, groups=groups)
        bias = None
    else:
        weight, bias, base = conv.weight, conv.bias, conv
    bias = t if bias is None else bias * s + t
    return _conv(weight * s.view(-1, 1, 1, 1), bias, base)


@torch.no_grad()
def _fuse_block(block: QLBlock) -> None:
    if isinstance(block.shortcut, Shortcut):
        sc = block.shortcut
        sc.conv, sc.bn = fold_conv_bn(sc.conv, sc.bn), nn.Identity()
    block.dw, block.bn_dw = fold_conv_bn(block.dw, block.bn_dw), nn.Identity()
    if isinstance(block.bn_coef, nn.BatchNorm2d):
        block.coef, block.bn_coef = fold_conv_bn(block.coef, block.bn_coef), nn.Identity()
        block.coef_bn = False
    if isinstance(block, Eq4Block):
        # bn_out(c * p) = (s c) * p + t: the scale goes into C, the shift after the product.
        s, t = bn_scale_shift(block.bn_out)
        bias = None if block.coef.bias is None else block.coef.bias * s
        block.coef = _conv(block.coef.weight * s.view(-1, 1, 1, 1), bias, block.coef)
        block.bn_out = ChannelBias(t)
    elif isinstance(getattr(block, "bn_out", None), nn.BatchNorm2d):
        block.proj, block.bn_out = fold_conv_bn(block.proj, block.bn_out), nn.Identity()


@torch.no_grad()
def _fuse_stem(stem: Stem) -> None:
    stem.conv, stem.bn = fold_conv_bn(stem.conv, stem.bn), nn.Identity()
    if stem.lin_conv is not None:
        stem.lin_conv, stem.lin_bn = fold_conv_bn(stem.lin_conv, stem.lin_bn), nn.Identity()


def fuse(model: QLNet) -> QLNet:
    """An eval-mode copy of `model` with every BN folded into the layer before it.

    Outputs agree with ``model.eval()`` to float rounding (1e-5 relative in fp32).
    """
    if not isinstance(model, QLNet):
        raise TypeError(f"fuse expects a QLNet, got {type(model).__name__}")
    fused = copy.deepcopy(model).eval()
    _fuse_stem(fused.stem)
    for mod in fused.modules():
        if isinstance(mod, QLBlock):
            _fuse_block(mod)
    fused.requires_grad_(False)
    fused.fused = True
    return fused
