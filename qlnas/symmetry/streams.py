"""The residual streams of a QLNet, the convs that read and write them, and their groups.

A stream is one stage's residual state u (``stage1`` .. ``stageS``). The stem's output is a
stream of its own (``stem``) only when stage 1's first block projects it (stem width != stage
width); otherwise it is stage 1's stream. The group on a stream is derived from the spec (see
docs/architecture.md §5): GL, cut down by every op that touches the stream other
than through a 1x1 conv.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qlnas.errors import UserError
from qlnas.models.blocks import QLBlock
from qlnas.models.net import QLNet
from qlnas.symmetry.groups import meet

# Forms whose blocks read the stream channel by channel, and through what.
CHANNELWISE_READ = {"eq3": "dw", "eq4": "dw", "eq5": "dw", "eq6": "u * C(u)", "eq7": "u * C(u)"}
# Forms whose blocks write the stream channel by channel (no 1x1 conv in front of it).
CHANNELWISE_WRITE = {"eq4": "C(u) * A(.)", "eq5": "sum of copies"}
ACT_GROUP = {"relu": "perm_pos_scale", "hardtanh": "signed_perm", "hardball": "o",
             "softball": "o"}


@dataclass(frozen=True)
class BlockLink:
    """One block with the streams it reads and writes."""

    name: str
    stage: int
    index: int
    block: QLBlock
    reads: str
    writes: str


@dataclass(frozen=True)
class Stream:
    """One residual stream: its width, who touches it, and the group that acts on it."""

    name: str
    width: int
    group: str
    reasons: tuple[str, ...]
    writers: tuple[str, ...]
    readers: tuple[str, ...]
    tied: bool = False
    """Eq.(5): its permutation is tied to every other stream's (one channel feeds copies)."""


def check_model(model: nn.Module) -> QLNet:
    if not isinstance(model, QLNet):
        raise UserError(f"the symmetry toolkit needs a QLNet model, got {type(model).__name__}")
    return model


def stem_is_separate(model: QLNet) -> bool:
    return not isinstance(model.stages[0][0].shortcut, nn.Identity)


def stage_stream(s: int) -> str:
    return f"stage{s + 1}"


def stem_stream(model: QLNet) -> str:
    return "stem" if stem_is_separate(model) else stage_stream(0)


def block_links(model: QLNet) -> list[BlockLink]:
    links = []
    for s, stage in enumerate(model.stages):
        for i, block in enumerate(stage):
            reads = stage_stream(s) if i else (stage_stream(s - 1) if s else stem_stream(model))
            links.append(BlockLink(f"stages.{s}.{i}", s, i, block, reads, stage_stream(s)))
    return links


def stream_widths(model: QLNet) -> dict[str, int]:
    widths = {}
    if stem_is_separate(model):
        widths["stem"] = model.spec.stem_width
    for s, w in enumerate(model.spec.widths):
        widths[stage_stream(s)] = w
    return widths


def find_streams(model: nn.Module) -> list[Stream]:
    """Every stream of the model, in order, with the group derived from its spec."""
    model = check_model(model)
    spec = model.spec
    widths = stream_widths(model)
    group = dict.fromkeys(widths, "gl")
    reasons: dict[str, list[str]] = {name: [] for name in widths}
    writers: dict[str, list[str]] = {name: [] for name in widths}
    readers: dict[str, list[str]] = {name: [] for name in widths}

    def cut(name: str, by: str, why: str) -> None:
        group[name] = meet(group[name], by)
        if why not in reasons[name]:
            reasons[name].append(why)

    stem = stem_stream(model)
    if spec.stem_linear:
        writers[stem].append("stem.lin_conv")
    else:
        writers[stem].append("stem.conv")
        cut(stem, "perm_pos_scale", "stem ReLU + max-pool")
    for link in block_links(model):
        form = link.block.form
        readers[link.reads].append(f"{link.name}.coef")
        if form in CHANNELWISE_READ:
            readers[link.reads].append(f"{link.name}.dw")
            cut(link.reads, "monomial", f"{form}: {CHANNELWISE_READ[form]} reads it channel-wise")
        writers[link.writes].append(f"{link.name}.proj" if hasattr(link.block, "proj")
                                    else f"{link.name}.dw*coef")
        if form in CHANNELWISE_WRITE:
            cut(link.writes, "monomial",
                f"{form}: {CHANNELWISE_WRITE[form]} writes it channel-wise")
        if not isinstance(link.block.shortcut, nn.Identity):
            readers[link.reads].append(f"{link.name}.shortcut.conv")
            writers[link.writes].append(f"{link.name}.shortcut.conv")
        act = _act_name(link.block.act)
        if act != "none":
            cut(link.writes, ACT_GROUP[act], f"{act} at {link.name}")
    last = stage_stream(len(spec.widths) - 1)
    if spec.num_classes > 0:
        readers[last].append("fc")
    tied = spec.form == "eq5"
    return [Stream(name, widths[name], group[name], tuple(reasons[name]) or ("1x1 convs only",),
                   tuple(writers[name]), tuple(readers[name]), tied) for name in widths]


def _act_name(act: nn.Module) -> str:
    if isinstance(act, nn.Identity):
        return "none"
    if isinstance(act, nn.ReLU):
        return "relu"
    if isinstance(act, nn.Hardtanh):
        return "hardtanh"
    name = type(act).__name__.lower()
    if name in ("hardball", "softball"):
        return name
    raise ValueError(f"unknown stream activation {type(act).__name__}")


def eq5_atoms(model: QLNet) -> int:
    """Eq.(5): number of channel groups whose permutation every stream shares.

    Channel j of a stream of width n feeds channels (m/n) j .. (m/n) j + m/n - 1 of the next
    one (width m), or (n/m) channels feed one when it narrows; so all streams permute blocks
    of consecutive channels together, as many blocks as the narrowest stream has channels.
    """
    widths = list(stream_widths(model).values())
    if not stem_is_separate(model):
        widths = [model.spec.stem_width] + widths
    for n, m in zip(widths, widths[1:], strict=False):
        if m % n and n % m:
            raise UserError(f"eq5 widths {n} -> {m}: neither divides the other; the tied "
                            "permutations of eq5 are only supported for integer ratios")
    return min(widths)


def tied_perm(atom_perm: torch.Tensor, width: int) -> torch.Tensor:
    """The permutation of a stream of `width` channels induced by a permutation of atoms."""
    size = width // len(atom_perm)
    offsets = torch.arange(size)
    return (atom_perm.unsqueeze(1) * size + offsets).reshape(-1)
