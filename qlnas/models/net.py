"""The network builder: one `ArchSpec` -> one `QLNet` module."""

from __future__ import annotations

import torch
from torch import nn

from qlnas.models.blocks import BLOCKS, QLBlock
from qlnas.models.spec import ArchSpec


class Stem(nn.Module):
    """ResNet-50 stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool), optionally a linear 1x1 + BN.

    The linear tail lets the stage-1 stream carry GL: the ReLU and max-pool before it only
    admit permutations with positive scalings.
    """

    def __init__(self, width: int, linear: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.lin_conv = nn.Conv2d(width, width, 1, bias=False) if linear else None
        self.lin_bn = nn.BatchNorm2d(width) if linear else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.bn(self.conv(x))))
        if self.lin_conv is not None:
            x = self.lin_bn(self.lin_conv(x))
        return x


class QLNet(nn.Module):
    """A quasi-linear hyperbolic ConvNet (Liu, Shao, Bai 2023) described by an `ArchSpec`.

    Initialisation: convs feeding a ReLU use Kaiming (fan-out), the linear 1x1 coefficient
    convs a variance-preserving normal (std 1/sqrt(fan_in)), and each block's last BN scale
    starts at zero (as timm does for ResNets), so every block starts as the identity map and
    the products inside F do not blow up early in training.
    """

    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        self.spec = spec
        self.num_classes = spec.num_classes
        self.stem = Stem(spec.stem_width, spec.stem_linear)
        block_cls = BLOCKS[spec.form]
        stages, n = [], spec.stem_width
        self.feature_info = [dict(num_chs=n, reduction=4, module="stem")]
        reduction = 4
        for s, (m, depth) in enumerate(zip(spec.widths, spec.depths, strict=True)):
            blocks = []
            for i in range(depth):
                stride = 2 if (i == 0 and s > 0) else 1
                act = spec.act if (spec.act_at == "all" or (spec.act_at == "ds" and i == 0)) \
                    else "none"
                blocks.append(block_cls(n, m, stride, spec.expansion, spec.weight_sharing,
                                        act, spec.act_radius))
                n = m
            reduction *= 2 if s > 0 else 1
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=m, reduction=reduction, module=f"stages.{s}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = n
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(n, spec.num_classes) if spec.num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Conv2d):
                if name == "stem.conv":
                    nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
                else:
                    fan_in = mod.weight.shape[1] * mod.weight[0, 0].numel()
                    nn.init.normal_(mod.weight, std=fan_in**-0.5)
            elif isinstance(mod, nn.BatchNorm2d):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)
        for mod in self.modules():
            if isinstance(mod, QLBlock):
                nn.init.zeros_(mod.last_bn().weight)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        if global_pool != "avg":
            raise ValueError(f"global_pool={global_pool!r}; only 'avg' is supported")
        self.num_classes = num_classes
        self.spec = self.spec.replace(num_classes=num_classes)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x).flatten(1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_model(spec: ArchSpec) -> QLNet:
    """Build the network a spec describes."""
    return QLNet(spec)
