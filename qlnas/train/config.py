"""`TrainConfig`: the typed training recipe, its YAML form and the shipped recipes."""

from __future__ import annotations

import ast
import dataclasses
import gc
import inspect
import math
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from qlnas.data.order import MODES as DATA_MODES
from qlnas.errors import UserError

OPTIMIZERS = ("sgd", "nesterov", "adamw", "lamb")
SCHEDULES = ("cosine", "step")
AMP = ("auto", "bf16", "fp16", "none")
ON_NAN = ("stop", "rollback")
DECODERS = ("scaled", "stock")
EXPORTS = ("best", "model", "ema")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; validated on construction."""

    model: str = "qlnet26n_eq3_softball_ds"
    """timm model name (any registered qlnet*, or a timm baseline such as resnet50)."""
    arch: dict = field(default_factory=dict)
    """ArchSpec field overrides for qlnet models, e.g. {form: eq4, act: hardball}; for another
    model (a family a search imports), its own keyword arguments."""
    init_from: str | None = None
    """Model file whose weights start the run (weights only: a fresh optimizer, schedule and
    epoch count); the classifier stays freshly initialised when its class count differs.
    Convert the authors' checkpoints with `qlnas convert` first. A resume takes the weights
    from its checkpoint instead."""
    train_data: str | None = None
    """Train .beton file; None: the embedded digits dataset."""
    val_data: str | None = None
    """Validation .beton file; None: the embedded digits dataset."""
    out: str = "runs/train"
    """Run folder: checkpoints/, tb/, metrics.csv, config.yaml, run_info.json."""
    epochs: int = 5
    """Epochs to train, warm-up included; the LR reaches its floor at the last step. A
    resume with another value continues the schedule over the new length from the current
    step."""
    batch_size: int = 64
    """Global batch size (split evenly over the DDP processes)."""
    lr: float = 0.2
    """Peak learning rate (after warm-up)."""
    warmup_epochs: float = 1.0
    """Linear warm-up length in epochs (fractions allowed), counted within `epochs`."""
    warmup_lr: float = 1e-4
    """Learning rate at the start of warm-up."""
    min_lr: float = 0.0
    """Floor of the cosine schedule, reached at the last step."""
    schedule: str = "cosine"
    """cosine or step, updated every iteration."""
    step_epochs: float = 30.0
    """Step schedule: epochs between decays."""
    step_gamma: float = 0.1
    """Step schedule: decay factor."""
    optimizer: str = "sgd"
    """sgd (momentum), nesterov, adamw or lamb (timm's create_optimizer_v2)."""
    momentum: float = 0.9
    """Momentum of SGD."""
    weight_decay: float = 5e-5
    """Weight decay, never applied to 1-D parameters (norms, biases)."""
    label_smoothing: float = 0.1
    """Label smoothing of the cross-entropy."""
    mixup: float = 0.0
    """Mixup alpha (0: off), timm's Mixup."""
    cutmix: float = 0.0
    """CutMix alpha (0: off), timm's Mixup."""
    drop_path_rate: float = 0.0
    """Stochastic depth: the largest drop rate of a block's residual branch (timm's
    drop_path_rate, rising linearly with depth)."""
    drop_rate: float = 0.0
    """Dropout before the classifier (timm's drop_rate)."""
    ema_decay: float = 0.0
    """EMA decay of the weights (0: no EMA), timm's ModelEmaV3; validated every epoch."""
    export: str = "best"
    """Weights of best.pt's score and of OUT/model.pt: model, ema, or best (whichever of the
    two validates better)."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value (0: no clipping)."""
    compile: bool = False
    """torch.compile the model."""
    amp: str = "auto"
    """auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 (with a GradScaler) or none."""
    fp16_init_scale: float = 65536.0
    """fp16: the GradScaler's initial loss scale."""
    max_overflow_steps: int = 20
    """fp16: consecutive overflow steps (skipped by the GradScaler) that count as
    divergence."""
    sync_bn: bool = False
    """SyncBatchNorm across the DDP processes (CUDA only)."""
    channels_last: bool = True
    """Use the channels_last memory format."""
    resolution: int = 32
    """Final train resolution and the validation resolution."""
    min_resolution: int = 0
    """Progressive resizing: start resolution (0: fixed resolution)."""
    ramp_epochs: int = 0
    """Progressive resizing: epoch by which the final resolution is reached."""
    crop_scale_min: float = 0.08
    """Smallest area fraction of a random-resized crop (0.08 for ImageNet)."""
    hflip: bool = True
    """Random horizontal flips (off for digits, whose mirror images are not digits)."""
    decoder: str = "scaled"
    """Train JPEG decoder: scaled (ours, decodes at the smallest DCT scale) or stock FFCV."""
    skip_corrupt: bool = False
    """Leave samples that fail to decode out of their batch, counted in the log, TensorBoard
    (data/skipped_samples) and result.json, instead of stopping the run with their names."""
    workers: int = 2
    """Loader threads per process."""
    data_mode: str = "auto"
    """How the data files are read: cached (memory-mapped through the page cache the node's
    processes share; a full shuffle), streamed (each process reads its share a window of
    pages at a time, for files larger than memory), or auto (cached when a file is at most
    half the node's memory)."""
    seed: int = 0
    """Seed of initialisation and data order."""
    on_nan: str = "stop"
    """On a non-finite loss or gradient: stop (status diverged) or rollback."""
    nan_lr_factor: float = 0.5
    """Rollback: multiply the learning rate by this factor."""
    max_rollbacks: int = 3
    """Rollback: give up (diverged) after this many rollbacks."""
    checkpoint_steps: int = 0
    """Also write checkpoints/last.pt every N steps (0: only at epoch ends)."""
    max_steps_per_epoch: int = 0
    """Cap on steps per epoch (0: the whole epoch); for quick proxies."""

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"{name}={getattr(self, name)!r}: expected {expected}")

        for name, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("amp", AMP),
                              ("on_nan", ON_NAN), ("decoder", DECODERS),
                              ("data_mode", DATA_MODES),
                              ("export", EXPORTS)):
            if getattr(self, name) not in choices:
                raise bad(name, "one of " + ", ".join(choices))
        for name in ("epochs", "batch_size", "resolution", "workers", "max_rollbacks",
                     "max_overflow_steps"):
            if getattr(self, name) < (0 if name == "max_rollbacks" else 1):
                raise bad(name, "a positive integer")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", "a positive number")
        for name in ("warmup_epochs", "warmup_lr", "min_lr", "weight_decay", "mixup", "cutmix",
                     "grad_clip", "step_epochs", "checkpoint_steps", "max_steps_per_epoch",
                     "min_resolution", "ramp_epochs"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise bad(name, "a finite number >= 0")
        if self.schedule == "step" and self.step_epochs == 0:
            raise bad("step_epochs", "a number > 0 with schedule step")
        if not (math.isfinite(self.step_gamma) and self.step_gamma > 0):
            raise bad("step_gamma", "a finite number > 0")
        if not 0 <= self.momentum < 1:
            raise bad("momentum", "a number in [0, 1)")
        if self.min_lr > self.lr:  # the cosine would rise to it
            raise bad("min_lr", f"a number <= lr={self.lr!r}")
        if not 0 < self.crop_scale_min <= 1:
            raise bad("crop_scale_min", "a number in (0, 1]")
        if not 0 <= self.label_smoothing < 1:
            raise bad("label_smoothing", "a number in [0, 1)")
        for name in ("drop_path_rate", "drop_rate"):
            if not 0 <= getattr(self, name) < 1:
                raise bad(name, "a number in [0, 1)")
        if not 0 <= self.ema_decay < 1:
            raise bad("ema_decay", "a number in [0, 1)")
        if not 0 < self.nan_lr_factor < 1:
            raise bad("nan_lr_factor", "a number in (0, 1)")
        if self.warmup_epochs and self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} is not shorter than "
                             f"epochs={self.epochs}; expected a warm-up shorter than the "
                             "run (it counts within epochs)")
        if not (math.isfinite(self.fp16_init_scale) and self.fp16_init_scale > 0):
            raise bad("fp16_init_scale", "a positive number")
        if self.export == "ema" and self.ema_decay == 0:
            raise bad("export", "model or best when ema_decay is 0 (there is no EMA)")
        if not isinstance(self.arch, dict):
            raise bad("arch", "a mapping of ArchSpec fields")
        if self.init_from is not None and (not isinstance(self.init_from, str)
                                           or not self.init_from.strip()):
            raise bad("init_from", "the path of a model file, or None")

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> TrainConfig:
        """Build from a mapping; unknown keys and bad values are a UserError naming them."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise UserError(f"{source}: unknown key {key!r} (known: {', '.join(known)})")
        hints = typing.get_type_hints(cls)
        clean = {}
        for key, value in data.items():
            clean[key] = _coerce(key, value, hints[key], source)
        try:
            return cls(**clean)
        except ValueError as exc:
            raise UserError(f"{source}: {exc}") from None


def _coerce(key: str, value: object, hint: object, source: str) -> object:
    """Check a YAML/CLI value against the field's type (ints may stand for floats)."""
    args = typing.get_args(hint)
    types = tuple(a for a in args if a is not type(None)) if args else (hint,)
    if value is None and type(None) in args:
        return None
    for t in types:
        if t is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if t is dict and isinstance(value, dict):
            return dict(value)
        if t in (int, str, bool) and type(value) is t:
            return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in types)
    raise UserError(f"{source}: {key}={value!r} has the wrong type; expected {names}")


# Shipped recipes. "demo": the embedded digits on CPU in a minute or two. "paper": timm's
# ResNeXt-50 recipe as the paper used it on ImageNet-100.
RECIPES: dict[str, dict] = {
    "demo": dict(model="qlnet26n_eq3_softball_ds", epochs=5, batch_size=64, lr=0.2,
                 warmup_epochs=1.0, resolution=32, weight_decay=5e-5, label_smoothing=0.1,
                 crop_scale_min=0.35, hflip=False),
    "paper": dict(epochs=50, batch_size=192, lr=0.3, warmup_epochs=5.0, schedule="cosine",
                  optimizer="sgd", momentum=0.9, weight_decay=1e-4, label_smoothing=0.1,
                  resolution=224, workers=8,
                  model="qlnet50_eq3_softball_ds"),
}


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field (for --help and the search-space docs)."""
    # CPython 3.11 keeps ast.parse's recursion count per interpreter, not per thread: a garbage
    # collection inside the parse can run a finalizer, hand the GIL to a thread that parses too,
    # and the parse then fails with "AST constructor recursion depth mismatch" (gh-106905).
    # With the collector off, nothing runs Python code within the parse.
    collecting = gc.isenabled()
    gc.disable()
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    finally:
        if collecting:
            gc.enable()
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) \
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a missing file or bad YAML is a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config keys")
    return data


def resolve_config(recipe: str | None = None, config_file: str | None = None,
                   overrides: dict | None = None) -> TrainConfig:
    """Recipe defaults, then a YAML file, then explicit overrides (later wins)."""
    data: dict = {}
    if recipe is not None:
        if recipe not in RECIPES:
            raise UserError(f"--recipe {recipe!r}: expected one of {', '.join(RECIPES)}")
        data.update(RECIPES[recipe])
    source = "overrides"
    if config_file is not None:
        data.update(load_yaml(config_file))
        source = str(config_file)
    data.update(overrides or {})
    return TrainConfig.from_dict(data, source=source)
