"""Training: one `fit` for torchrun, `qlnas train --nproc` and Ray Train workers."""

from qlnas.train.config import RECIPES, TrainConfig, resolve_config
from qlnas.train.fit import EXIT_CODES, fit

__all__ = ["EXIT_CODES", "RECIPES", "TrainConfig", "fit", "resolve_config"]
