"""`ArchSpec`: the frozen description of one QL-ConvNet variant, and its names.

A model name is a size preset followed by tokens, e.g. ``qlnet50_eq3_nows_x6_softball_ds``:
form, ``nows`` when the 3x3 weights are per channel, ``x<k>`` when the expansion is not 4,
``sl``/``nosl`` when the linear stem differs from the form's default, then the activation and
its placement (omitted for ``none``). Named presets (`PRESETS`, e.g. ``qlnet50_liu2023``) are
specs that no token name describes; their names map to them both ways.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

FORMS = ("eq3", "eq4", "eq5", "eq6", "eq7", "glb")
ACTS = ("none", "relu", "hardtanh", "hardball", "softball")
ACT_AT = ("ds", "all", "none", "proj")

# Size presets: depths and residual-stream widths per stage.
SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "qlnet50": ((3, 4, 6, 3), (64, 128, 256, 512)),
    "qlnet26": ((2, 2, 2, 2), (64, 128, 256, 512)),
    "qlnet26n": ((2, 2, 2, 2), (32, 64, 128, 256)),
}


def _check_choice(field_name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(
            f"ArchSpec.{field_name}={value!r} is invalid; allowed: {', '.join(map(str, allowed))}"
        )


@dataclass(frozen=True)
class ArchSpec:
    """One QL-ConvNet variant (see docs/architecture.md)."""

    form: str = "eq3"
    """Block equation: eq3..eq7 (the paper's forms) or glb (the GL-symmetric block)."""
    act: str = "softball"
    """Activation on the residual stream: none, relu, hardtanh, hardball, softball."""
    act_at: str = "ds"
    """Placement: ds (end of each stage's first block), all (every block), proj (end of each
    block with a projection skip: as ds, except where a stage's first block keeps its
    width and stride), none."""
    weight_sharing: bool = True
    """One 3x3 kernel per expansion copy shared by all channels (True) or one per channel."""
    expansion: int | tuple[int, ...] = 4
    """Internal width multiplier k (block 0 of a stage works at k times the width it reads).
    A tuple gives one k per stage's stream: a block uses the entry of the stream it reads
    (block 0 of stage s+1 reads stage s; block 0 of stage 1 reads the stem and uses entry 0).
    A tuple of equal entries is stored as that int."""
    widths: tuple[int, ...] = (64, 128, 256, 512)
    """Residual-stream width of each stage."""
    depths: tuple[int, ...] = (3, 4, 6, 3)
    """Number of blocks in each stage."""
    stem_linear: bool | None = None
    """A 1x1 conv + BN after the stem so stage 1 can carry GL; None: True for glb only."""
    num_classes: int = 1000
    """Classifier outputs (0: no classifier, features only)."""
    act_radius: float | None = None
    """Radius R of hardball/softball; None: sqrt(channels) of the stream."""
    stem_width: int = field(default=64)
    """Output channels of the 7x7 stem."""
    coef_bn: bool = False
    """A BN after the coefficient conv (coef) of every block, before its product."""
    act_last: bool = False
    """The activation also at the end of the last block (the stream the head pools), wherever
    act_at puts it otherwise."""

    def __post_init__(self) -> None:
        _check_choice("form", self.form, FORMS)
        _check_choice("act", self.act, ACTS)
        _check_choice("act_at", self.act_at, ACT_AT)
        if (self.act == "none") != (self.act_at == "none"):
            raise ValueError(
                f"ArchSpec.act={self.act!r} with act_at={self.act_at!r} is invalid; "
                "act and act_at must both be 'none' or both not 'none'"
            )
        if not isinstance(self.weight_sharing, bool):
            raise ValueError(f"ArchSpec.weight_sharing={self.weight_sharing!r}; expected a bool")
        widths, depths = tuple(self.widths), tuple(self.depths)
        object.__setattr__(self, "widths", widths)
        object.__setattr__(self, "depths", depths)
        if not widths or len(widths) != len(depths):
            raise ValueError(
                f"ArchSpec.widths={widths} and depths={depths}; expected equal, non-zero lengths"
            )
        self._check_expansion()
        if any(not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"ArchSpec.widths={widths}; expected positive integers")
        if any(not isinstance(d, int) or d < 1 for d in depths):
            raise ValueError(f"ArchSpec.depths={depths}; expected positive integers")
        if not isinstance(self.stem_width, int) or isinstance(self.stem_width, bool) \
                or self.stem_width < 1:
            raise ValueError(f"ArchSpec.stem_width={self.stem_width!r}; expected a positive "
                             "integer")
        if self.form == "eq5":
            reads = (self.stem_width,) + widths[:-1]
            for s, (n, m) in enumerate(zip(reads, widths, strict=True)):
                k = self.expansions[max(s - 1, 0)]
                if (k * n) % m:
                    raise ValueError(
                        f"ArchSpec.widths={widths} is invalid for form 'eq5' with expansion "
                        f"{self.expansion}: {k}*{n} copies cannot be summed into {m}"
                    )
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"ArchSpec.num_classes={self.num_classes!r}; expected an int >= 0")
        if self.act_radius is not None and not self.act_radius > 0:
            raise ValueError(f"ArchSpec.act_radius={self.act_radius!r}; expected > 0")
        if self.stem_linear is None:
            object.__setattr__(self, "stem_linear", self.form == "glb")
        for name in ("coef_bn", "act_last"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ArchSpec.{name}={getattr(self, name)!r}; expected a bool")
        if self.act_last and self.act == "none":
            raise ValueError("ArchSpec.act_last=True with act='none' is invalid; expected an "
                             "activation to place at the end of the last block")

    def _check_expansion(self) -> None:
        value = self.expansion
        if isinstance(value, list | tuple):
            value = tuple(value)
            if len(value) != len(self.widths):
                raise ValueError(f"ArchSpec.expansion={value}; expected an integer >= 1 or one "
                                 f"per stage ({len(self.widths)})")
            if len(set(value)) == 1:
                value = value[0]
        ks = value if isinstance(value, tuple) else (value,)
        if any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
            raise ValueError(f"ArchSpec.expansion={self.expansion!r}; expected an integer >= 1 "
                             "or a tuple of them, one per stage")
        if self.form == "glb" and any(k % 2 for k in ks):
            raise ValueError(
                f"ArchSpec.expansion={self.expansion} is invalid for form 'glb'; expected an "
                "even integer (two branches of k/2 copies each)"
            )
        object.__setattr__(self, "expansion", value)

    @property
    def expansions(self) -> tuple[int, ...]:
        """The expansion of each stage's stream (see `expansion`)."""
        e = self.expansion
        return e if isinstance(e, tuple) else (e,) * len(self.widths)

    def block_expansion(self, stage: int, index: int) -> int:
        """k of block `index` of `stage`: the entry of the stream it reads."""
        return self.expansions[stage - 1 if (index == 0 and stage > 0) else stage]

    def act_here(self, stage: int, index: int, projects: bool) -> bool:
        """Whether the block ends with the activation (`projects`: it has a projection skip)."""
        last = stage == len(self.depths) - 1 and index == self.depths[-1] - 1
        return (self.act_at == "all" or (self.act_at == "ds" and index == 0)
                or (self.act_at == "proj" and projects) or (self.act_last and last))

    def replace(self, **changes) -> ArchSpec:
        """A copy with some fields changed (validated again)."""
        data = dataclasses.asdict(self)
        if "form" in changes and "stem_linear" not in changes:
            data["stem_linear"] = None  # the new form's default
        data.update(changes)
        return ArchSpec(**data)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["widths"], d["depths"] = list(self.widths), list(self.depths)
        if isinstance(self.expansion, tuple):
            d["expansion"] = list(self.expansion)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> ArchSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown ArchSpec field(s): {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        return cls(**data)


def size_of(spec: ArchSpec) -> str | None:
    """The size preset whose depths and widths the spec has, if any."""
    for size, (depths, widths) in SIZES.items():
        if spec.depths == depths and spec.widths == widths and spec.stem_width == 64:
            return size
    return None


def spec_to_name(spec: ArchSpec) -> str:
    """The canonical model name of a spec (raises if the spec's size is not a preset)."""
    for name, preset in PRESETS.items():
        if preset.spec == spec.replace(num_classes=preset.spec.num_classes):
            return name
    size = size_of(spec)
    if size is None or spec.act_radius is not None or isinstance(spec.expansion, tuple) \
            or spec.coef_bn or spec.act_last or spec.act_at == "proj":
        raise ValueError(f"spec has no preset name (custom widths/depths/radius): {spec}")
    tokens = [size, spec.form]
    if not spec.weight_sharing:
        tokens.append("nows")
    if spec.expansion != 4:
        tokens.append(f"x{spec.expansion}")
    if spec.stem_linear != (spec.form == "glb"):
        tokens.append("sl" if spec.stem_linear else "nosl")
    tokens.append(spec.act)
    if spec.act != "none":
        tokens.append(spec.act_at)
    return "_".join(tokens)


def name_to_spec(name: str, num_classes: int = 1000) -> ArchSpec:
    """Parse a model name (see the module docstring) into a spec."""
    if name in PRESETS:
        return PRESETS[name].spec.replace(num_classes=num_classes)
    tokens = name.split("_")
    size = tokens.pop(0)
    if size not in SIZES:
        raise ValueError(f"model name {name!r}: unknown size {size!r}; known: {', '.join(SIZES)}")
    depths, widths = SIZES[size]
    fields: dict = {"depths": depths, "widths": widths, "num_classes": num_classes}
    if not tokens or tokens[0] not in FORMS:
        raise ValueError(f"model name {name!r}: expected a form ({', '.join(FORMS)}) after {size}")
    fields["form"] = tokens.pop(0)
    if tokens and tokens[0] == "nows":
        fields["weight_sharing"] = False
        tokens.pop(0)
    if tokens and tokens[0].startswith("x") and tokens[0][1:].isdigit():
        fields["expansion"] = int(tokens.pop(0)[1:])
    if tokens and tokens[0] in ("sl", "nosl"):
        fields["stem_linear"] = tokens.pop(0) == "sl"
    if not tokens or tokens[0] not in ACTS:
        raise ValueError(f"model name {name!r}: expected an activation ({', '.join(ACTS)})")
    fields["act"] = tokens.pop(0)
    if fields["act"] == "none":
        fields["act_at"] = "none"
    elif tokens and tokens[0] in ACT_AT:
        fields["act_at"] = tokens.pop(0)
    if tokens:
        raise ValueError(f"model name {name!r}: unexpected token(s) {'_'.join(tokens)!r}")
    return ArchSpec(**fields)


# The named variants: every Table 1 row plus the GL-symmetric block.
VARIANTS = (
    "eq3_relu_all",
    "eq3_hardtanh_ds",
    "eq3_hardball_ds",
    "eq3_softball_ds",
    "eq3_nows_softball_ds",
    "eq3_nows_x6_softball_ds",
    "eq4_softball_ds",
    "eq5_softball_ds",
    "eq6_softball_ds",
    "eq7_nows_x6_softball_ds",
    "glb_softball_ds",
    "glb_none",
)


@dataclass(frozen=True)
class Preset:
    """A named spec that the name tokens do not describe, and where it comes from."""

    spec: ArchSpec
    source: str


PRESETS: dict[str, Preset] = {
    "qlnet50_liu2023": Preset(
        ArchSpec(form="glb", act="hardball", act_at="proj", act_last=True,
                 weight_sharing=False, expansion=(8, 8, 4, 4), coef_bn=True, stem_linear=False,
                 widths=(64, 128, 256, 512), depths=(3, 4, 6, 3)),
        "the first author's published QLNet (PDEBlock of his ConvNets-PDE-perspective "
        "resnet.py; the liuyao/QLNet weights); `qlnas convert` reads its checkpoints"),
}
"""The authors' published network: a GL block (form glb, k = 2x theirs: 4 on streams up to 128
channels, else 2) with a BN on the coefficient conv, per-channel 3x3 kernels, hardball (R^2 =
the width) after each projection skip and before pooling."""
