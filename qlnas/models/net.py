"""The network builder: one `ArchSpec` -> one `QLNet` module, with timm's model interface."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models import checkpoint_seq
from timm.models._features import feature_take_indices
from torch import nn

from qlnas.models.blocks import BLOCKS, QLBlock
from qlnas.models.spec import ArchSpec


def check_global_pool(global_pool: str | None) -> None:
    """Only average pooling exists (None: keep it); anything else is refused, not ignored."""
    if global_pool not in (None, "avg"):
        raise ValueError(f"global_pool={global_pool!r} is not supported; only 'avg'")


def _check_rate(name: str, rate: float) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise ValueError(f"{name}={rate!r}; expected a number in [0, 1)")
    return float(rate)


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

    ``drop_rate`` (dropout before the classifier) and ``drop_path_rate`` (stochastic depth,
    rising linearly from 0 at the first block to the rate at the last) regularise training;
    they are not part of the architecture, so not of the spec.
    """

    def __init__(self, spec: ArchSpec, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 global_pool: str | None = "avg") -> None:
        super().__init__()
        check_global_pool(global_pool)
        self.spec = spec
        self.num_classes = spec.num_classes
        self.drop_rate = _check_rate("drop_rate", drop_rate)
        self.drop_path_rate = _check_rate("drop_path_rate", drop_path_rate)
        self.grad_checkpointing = False
        self.stem = Stem(spec.stem_width, spec.stem_linear)
        block_cls = BLOCKS[spec.form]
        rates = iter(torch.linspace(0, self.drop_path_rate, sum(spec.depths)).tolist())
        stages, n = [], spec.stem_width
        self.feature_info = [dict(num_chs=n, reduction=4, module="stem")]
        reduction = 4
        for s, (m, depth) in enumerate(zip(spec.widths, spec.depths, strict=True)):
            blocks = []
            for i in range(depth):
                stride = 2 if (i == 0 and s > 0) else 1
                projects = stride != 1 or n != m
                act = spec.act if spec.act_here(s, i, projects) else "none"
                blocks.append(block_cls(n, m, stride, spec.block_expansion(s, i),
                                        spec.weight_sharing, act, spec.act_radius, next(rates),
                                        coef_bn=spec.coef_bn))
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
    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """Parameter groups for layer-wise LR decay: the stem, then each stage or block."""
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> nn.Module | str:
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        check_global_pool(global_pool)
        self.num_classes = num_classes
        self.spec = self.spec.replace(num_classes=num_classes)
        like = self.stem.conv.weight
        self.fc = nn.Linear(self.num_features, num_classes, device=like.device, dtype=like.dtype) \
            if num_classes > 0 else nn.Identity()

    def _run_stage(self, stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(stage, x)
        return stage(x)

    def forward_intermediates(
            self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
            stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The features at `indices` (0: the stem, s: stage s; an int n: the last n), as timm's
        models give them. There is no final norm, so `norm` changes nothing."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r} is not supported; only 'NCHW'")
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        x = self.stem(x)
        intermediates = [x] if 0 in take_indices else []
        stages = self.stages[:max_index] if stop_early else self.stages
        for i, stage in enumerate(stages, start=1):
            x = self._run_stage(stage, x)
            if i in take_indices:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last feature in `indices` (and the classifier with
        `prune_head`, or when stages go); returns the absolute indices kept."""
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        prune_end = max_index < len(self.stages)
        if prune_end:
            self.stages = self.stages[:max_index]
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:  # the classifier was sized for the last stage
            self.reset_classifier(0)
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.stages, x, flatten=True)
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x).flatten(1)
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_model(spec: ArchSpec) -> QLNet:
    """Build the network a spec describes."""
    return QLNet(spec)
