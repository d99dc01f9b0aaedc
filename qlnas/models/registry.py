"""timm registration: `timm.create_model("qlnet50_eq3_softball_ds")` and the generic sizes.

Every size preset gets a generic entry (``qlnet50``, ``qlnet26``, ...) that takes spec fields
as kwargs, and one named entry per variant in `VARIANTS`.
"""

from __future__ import annotations

import sys

from timm.models import build_model_with_cfg, register_model
from timm.models._registry import generate_default_cfgs

from qlnas.models.net import QLNet
from qlnas.models.spec import SIZES, VARIANTS, ArchSpec, name_to_spec

_SPEC_FIELDS = set(ArchSpec.__dataclass_fields__)


def _cfg(**overrides) -> dict:
    cfg = dict(
        num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
        interpolation="bilinear", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        first_conv="stem.conv", classifier="fc", license="mit",
    )
    cfg.update(overrides)
    return cfg


def _build(variant: str, base: ArchSpec, pretrained: bool, **kwargs) -> QLNet:
    spec_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _SPEC_FIELDS}
    for key in ("in_chans", "drop_rate", "drop_path_rate", "global_pool"):
        value = kwargs.pop(key, None)
        if key == "in_chans" and value not in (None, 3):
            raise ValueError(f"{variant}: in_chans={value}; only 3 is supported")
    spec = base.replace(**spec_kwargs)
    return build_model_with_cfg(
        lambda cfg, **kw: QLNet(cfg), variant, pretrained, model_cfg=spec,
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
    module.default_cfgs = generate_default_cfgs({name: _cfg() for name in names})
    for name in names:
        register_model(getattr(module, name))
    return names


REGISTERED = _register_all()
