"""A model family of a user's own, outside qlnas: a search imports this module (`imports:`)
and searches `tinynet` by name with its own keyword arguments."""

import os

import torch
from timm.models import build_model_with_cfg, register_model
from torch import nn


class TinyNet(nn.Module):
    """Conv-BN-ReLU blocks of `width` channels, `depth` of them, then a linear head."""

    def __init__(self, width: int = 8, depth: int = 1, num_classes: int = 10,
                 in_chans: int = 3, drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        layers, c = [], in_chans
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU()]
            c = width
        self.features = nn.Sequential(*layers)
        self.num_classes = num_classes
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


@register_model
def tinynet(pretrained: bool = False, **kwargs) -> TinyNet:
    """As timm's own entry points: build_model_with_cfg takes timm's pretrained-config
    arguments, the rest go to the model."""
    return build_model_with_cfg(TinyNet, "tinynet", pretrained, **kwargs)


@register_model
def crashnet(pretrained: bool = False, **kwargs) -> TinyNet:
    """With QLNAS_TEST_CRASH set, ends its process when built, as the kernel's OOM killer
    ends a trial's actor (the trainable gets no chance to write how it ended); a tinynet
    otherwise."""
    if os.environ.get("QLNAS_TEST_CRASH"):
        os._exit(1)
    return build_model_with_cfg(TinyNet, "crashnet", pretrained, **kwargs)
