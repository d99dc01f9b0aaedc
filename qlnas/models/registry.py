"""timm registration: `timm.create_model("qlnet50_eq3_softball_ds")` and the generic sizes.

Every size preset gets a generic entry (``qlnet50``, ``qlnet26``, ...) that takes spec fields
as kwargs, one named entry per variant in `VARIANTS` and one per named preset in `PRESETS`
(e.g. ``qlnet50_liu2023``, the authors' published network). Besides spec fields, entries take
timm's model arguments (`VALID_ARGS`); any other keyword is an error that names it.
"""

from __future__ import annotations

import sys
from functools import partial

from timm.models import build_model_with_cfg, register_model
from timm.models._registry import generate_default_cfgs

from qlnas.models.net import QLNet
from qlnas.models.spec import PRESETS, SIZES, VARIANTS, ArchSpec, name_to_spec

_SPEC_FIELDS = set(ArchSpec.__dataclass_fields__)
# What `timm.create_model` hands an entry point besides spec fields: the model's own arguments
# (regularisation, the head, input checks, placement; `_create`) and those
# `build_model_with_cfg` consumes (the pretrained config, the feature-extraction wrapper).
_MODEL_ARGS = {"drop_rate", "drop_path_rate", "global_pool", "in_chans", "output_stride",
               "device", "dtype"}
_BUILDER_ARGS = {"pretrained_cfg", "pretrained_cfg_overlay", "pretrained_model_args",
                 "cache_dir", "features_only", "out_indices", "feature_cls"}
VALID_ARGS = tuple(sorted(_SPEC_FIELDS | _MODEL_ARGS | _BUILDER_ARGS))


def _cfg(**overrides) -> dict:
    cfg = dict(
        num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
        interpolation="bilinear", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        first_conv="stem.conv", classifier="fc", license="mit",
    )
    cfg.update(overrides)
    return cfg


def _create(variant: str, cfg: ArchSpec, num_classes: int = 1000, in_chans: int = 3,
            output_stride: int = 32, device=None, dtype=None, **kwargs) -> QLNet:
    """The model class `build_model_with_cfg` calls: num_classes and in_chans come from the
    pretrained config unless given."""
    if in_chans != 3:
        raise ValueError(f"{variant}: in_chans={in_chans}; only 3 is supported")
    if output_stride != 32:
        raise ValueError(f"{variant}: output_stride={output_stride}; only 32 is supported")
    model = QLNet(cfg.replace(num_classes=num_classes), **kwargs)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def _build(variant: str, base: ArchSpec, pretrained: bool, **kwargs) -> QLNet:
    unknown = [k for k in kwargs if k not in VALID_ARGS]
    if unknown:
        names = ", ".join(map(repr, unknown))
        raise ValueError(f"{variant}: unknown argument{'s' * (len(unknown) > 1)} {names}; "
                         f"valid: {', '.join(VALID_ARGS)}")
    spec_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _SPEC_FIELDS - {"num_classes"}}
    return build_model_with_cfg(
        partial(_create, variant), variant, pretrained, model_cfg=base.replace(**spec_kwargs),
        feature_cfg=dict(flatten_sequential=True), **kwargs,
    )


def _make_entry(name: str, base: ArchSpec):
    def entry(pretrained: bool = False, **kwargs) -> QLNet:
        return _build(name, base, pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"QL-ConvNet {name}: {base}"
    entry.__module__ = __name__
    return entry


def _register_all() -> list[str]:
    names = []
    module = sys.modules[__name__]
    for size, (depths, widths) in SIZES.items():
        names.append(size)
        setattr(module, size, _make_entry(size, ArchSpec(depths=depths, widths=widths)))
        for variant in VARIANTS:
            name = f"{size}_{variant}"
            names.append(name)
            setattr(module, name, _make_entry(name, name_to_spec(name)))
    for name in PRESETS:
        names.append(name)
        setattr(module, name, _make_entry(name, name_to_spec(name)))
    module.default_cfgs = generate_default_cfgs({name: _cfg() for name in names})
    for name in names:
        register_model(getattr(module, name))
    return names


REGISTERED = _register_all()
