"""Layers of the QL-ConvNets: the radial activations, their factory, the depthwise 3x3 conv."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class HardBall(nn.Module):
    """Radial clip: x if |x| < R else R x / |x|, |x| the Euclidean norm over channels."""

    def __init__(self, channels: int, radius: float | None = None) -> None:
        super().__init__()
        self.radius = float(radius) if radius is not None else math.sqrt(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        return x * (self.radius / norm.clamp_min(self.radius))

    def extra_repr(self) -> str:
        return f"radius={self.radius:.4g}"


class SoftBall(nn.Module):
    """Smooth radial squashing: x / sqrt(1 + |x|^2 / R^2), norm over channels."""

    def __init__(self, channels: int, radius: float | None = None) -> None:
        super().__init__()
        self.radius = float(radius) if radius is not None else math.sqrt(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sq = x.pow(2).sum(dim=1, keepdim=True)
        return x * torch.rsqrt(1.0 + sq / self.radius**2)

    def extra_repr(self) -> str:
        return f"radius={self.radius:.4g}"


def create_act(name: str, channels: int, radius: float | None = None) -> nn.Module:
    """Build an activation by name, so configs can name them."""
    if name == "none":
        return nn.Identity()
    if name == "relu":
        return nn.ReLU(inplace=False)
    if name == "hardtanh":
        return nn.Hardtanh(-1.0, 1.0)
    if name == "hardball":
        return HardBall(channels, radius)
    if name == "softball":
        return SoftBall(channels, radius)
    raise ValueError(
        f"unknown activation {name!r}; allowed: none, relu, hardtanh, hardball, softball"
    )


class DepthwiseConv3x3(nn.Module):
    """3x3 depthwise conv that makes k copies of each of n channels (output channel j*k + c).

    ``expand=True``: input n channels -> output n*k (groups=n, multiplier k).
    ``expand=False``: input already n*k channels, one 3x3 per channel.
    ``shared=True``: one kernel per copy c, shared by every channel j. It is applied with the
    channels folded into the batch, so the repeated (n*k, 1, 3, 3) weight never exists.
    """

    def __init__(self, channels: int, k: int, shared: bool, stride: int = 1,
                 expand: bool = True) -> None:
        super().__init__()
        self.channels, self.k, self.shared = channels, k, shared
        self.stride, self.expand = stride, expand
        if shared:
            self.weight = nn.Parameter(torch.empty(k, 1, 3, 3))
        else:
            self.weight = nn.Parameter(torch.empty(channels * k, 1, 3, 3))
        nn.init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="linear")

    def full_weight(self) -> torch.Tensor:
        """The (n*k, 1, 3, 3) weight of the equivalent grouped conv."""
        return self.weight.repeat(self.channels, 1, 1, 1) if self.shared else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.channels, self.k
        if not self.shared:
            groups = n if self.expand else n * k
            return F.conv2d(x, self.weight, None, self.stride, 1, 1, groups)
        b, _, h, w = x.shape
        cin = 1 if self.expand else k
        y = F.conv2d(x.reshape(b * n, cin, h, w), self.weight, None, self.stride, 1, 1,
                     1 if self.expand else k)
        return y.reshape(b, n * k, y.shape[-2], y.shape[-1])

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, k={self.k}, shared={self.shared}, "
                f"stride={self.stride}, expand={self.expand}")
