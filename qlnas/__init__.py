"""qlnas: train and search quasi-linear hyperbolic ConvNets."""

from qlnas import models  # noqa: F401  (registers every variant with timm)

__version__ = "0.1.0"
