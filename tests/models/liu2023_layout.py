"""The authors' published network in THEIR key layout, written here from its description.

Issue 16 describes it: timm's ResNet stem (``conv1``, ``bn1``, ReLU, 3x3/2 max-pool); per block
a 1x1 conv + BN (``conv1.conv``, ``conv1.bn``) from the stream to 2w channels, its two halves
multiplied, a 3x3 depthwise conv with multiplier 2 and a kernel per channel (``conv2``, w ->
2w), ``bn2``, a 1x1 conv + BN back to the stream (``conv3.conv``, ``conv3.bn``), plus the skip
(identity, or ``skip.conv``/``skip.bn`` at a stage's first block); w = k x the block's input
width, k = 4 up to 128 channels, else 2; a hardball with R^2 = the output width after each
block with a projection skip, and one with R^2 = 512 before pooling; head ``fc``. This is an
independent transcription (none of qlnas's modules), so a conversion is checked against it.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def hardball(x: torch.Tensor, radius_sq: float) -> torch.Tensor:
    norm = x.pow(2).sum(1, keepdim=True).sqrt()
    r = math.sqrt(radius_sq)
    return torch.where(norm > r, r * x / norm, x)


class ConvBN(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class TheirBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        w = (4 if cin <= 128 else 2) * cin
        self.w = w
        self.conv1 = ConvBN(cin, 2 * w)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, stride=stride, padding=1, groups=w, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * w)
        self.conv3 = ConvBN(2 * w, cout)
        self.skip = ConvBN(cin, cout, stride) if (stride != 1 or cin != cout) else None
        self.radius_sq = float(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        y = y[:, :self.w] * y[:, self.w:]
        y = self.conv3(self.bn2(self.conv2(y)))
        if self.skip is None:
            return x + y
        return hardball(self.skip(x) + y, self.radius_sq)


class TheirNet(nn.Module):
    def __init__(self, num_classes: int = 100) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = 64
        for s, (width, depth) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True)):
            blocks = []
            for b in range(depth):
                blocks.append(TheirBlock(cin, width, 2 if (b == 0 and s > 0) else 1))
                cin = width
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = hardball(x, 512.0)
        return self.fc(x.mean((2, 3)))


SKIP_SCALE = (0.6, 1.2)
"""Skip-BN scales that put the streams partly inside, partly outside the hardball radius."""


@torch.no_grad()
def random_their_net(num_classes: int = 100, seed: int = 0,
                     dtype: torch.dtype = torch.float64) -> TheirNet:
    """Random weights and random BN statistics (eval mode), scaled so the products stay tame
    and the streams reach the hardball radius."""
    torch.manual_seed(seed)
    net = TheirNet(num_classes).to(dtype)
    gen = torch.Generator().manual_seed(seed)

    def uniform(shape, lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=dtype)

    for name, mod in net.named_modules():
        if isinstance(mod, nn.Conv2d):
            fan_in = mod.weight[0].numel()
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen, dtype=dtype)
                             * fan_in ** -0.5)
        elif isinstance(mod, nn.BatchNorm2d):
            c = mod.num_features
            if name.endswith("conv3.bn"):
                lo, hi = 0.1, 0.3
            elif name.endswith("skip.bn"):
                lo, hi = SKIP_SCALE
            else:
                lo, hi = 0.5, 1.5
            sign = torch.randint(0, 2, (c,), generator=gen).to(dtype) * 2 - 1
            mod.weight.copy_(uniform(c, lo, hi) * sign)
            mod.bias.copy_(uniform(c, -0.2, 0.2))
            mod.running_mean.copy_(uniform(c, -0.2, 0.2))
            mod.running_var.copy_(uniform(c, 0.5, 2.0))
            mod.num_batches_tracked.fill_(1000)
    return net.eval()
