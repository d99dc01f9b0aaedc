"""The QL-ConvNet family: specs, layers, blocks, the builder and timm registration."""

from qlnas.models.fuse import fuse
from qlnas.models.layers import DepthwiseConv3x3, HardBall, SoftBall, create_act
from qlnas.models.net import QLNet, build_model
from qlnas.models.registry import REGISTERED
from qlnas.models.spec import SIZES, VARIANTS, ArchSpec, name_to_spec, spec_to_name

__all__ = [
    "REGISTERED", "SIZES", "VARIANTS", "ArchSpec", "DepthwiseConv3x3", "HardBall", "QLNet",
    "SoftBall", "build_model", "create_act", "fuse", "name_to_spec", "spec_to_name",
]
