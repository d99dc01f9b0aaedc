"""timm's model contract on every registered variant: arguments, regularisation, features,
intermediates, checkpointing, layer decay, TorchScript, FX and the pretrained config."""

import copy
import functools

import pytest
import timm
import torch
from timm.data import resolve_data_config
from timm.layers import DropPath
from timm.models import group_parameters
from timm.optim import create_optimizer_v2
from torch import nn

import qlnas  # noqa: F401 - registers the models
from qlnas.models import fuse
from qlnas.models.blocks import QLBlock
from qlnas.models.spec import FORMS
from qlnas.symmetry.fold import randomize_bn
from qlnas.symmetry.verify import EXACT, verify

ALL = timm.list_models("qlnet*")
X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
NO_JIT_WARNING = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


def _prepared(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics, so every block's products are live (a fresh block is the
    identity)."""
    randomize_bn(model, torch.Generator().manual_seed(seed))
    return model


@functools.cache
def _eval_model(name: str) -> nn.Module:
    """One eval-mode model per variant for the tests that only read it (copy to change it)."""
    torch.manual_seed(0)
    return _prepared(timm.create_model(name, num_classes=10)).eval()


@functools.cache
def _reference(name: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Eager logits and all intermediates (stem, stages) of `_eval_model(name)` on X."""
    model = _eval_model(name)
    with torch.no_grad():
        final, inter = model.forward_intermediates(X)
        return model.forward_head(final), inter


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    # Eager mode may run the native depthwise kernel, which sums in another order.
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _blocks(model: nn.Module) -> list[QLBlock]:
    return [m for m in model.modules() if isinstance(m, QLBlock)]


# --- arguments -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["qlnet26n", "qlnet50_eq3_softball_ds"])
def test_unknown_argument_names_it_and_lists_the_valid_ones(name):
    with pytest.raises(ValueError, match=rf"^{name}: unknown argument 'fomr'; valid: act, act_at,"
                       ) as info:
        timm.create_model(name, fomr="eq4")
    valid = str(info.value).split("valid: ")[1].split(", ")
    for key in ("form", "num_classes", "drop_rate", "drop_path_rate", "global_pool",
                "features_only", "out_indices", "pretrained_cfg"):
        assert key in valid
    with pytest.raises(ValueError, match=r"unknown arguments 'fomr', 'drop_path'"):
        timm.create_model(name, fomr="eq4", drop_path=0.1)


@pytest.mark.parametrize("pool", ["max", "", "avgmax"])
def test_global_pool_other_than_avg_is_refused(pool):
    with pytest.raises(ValueError, match=f"global_pool={pool!r}"):
        timm.create_model("qlnet26n", global_pool=pool)
    model = timm.create_model("qlnet26n", global_pool="avg")
    with pytest.raises(ValueError, match=f"global_pool={pool!r}"):
        model.reset_classifier(3, pool)
    model.reset_classifier(3)
    model.reset_classifier(4, "avg")
    assert model.num_classes == 4
    assert model.forward_head(torch.randn(2, model.num_features, 2, 2)).shape == (2, 4)


@pytest.mark.parametrize("kwargs,message", [
    (dict(in_chans=1), "in_chans=1"),
    (dict(output_stride=16), "output_stride=16"),
    (dict(drop_path_rate=1.5), "drop_path_rate=1.5"),
    (dict(drop_rate=-0.1), "drop_rate=-0.1"),
])
def test_unsupported_values_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        timm.create_model("qlnet26n", **kwargs)


def test_pretrained_cfg_overlay_sets_default_classes_and_dtype_is_honoured():
    model = timm.create_model("qlnet26n", pretrained_cfg_overlay=dict(num_classes=7),
                              dtype=torch.float64)
    assert model.num_classes == model.spec.num_classes == 7
    assert model.pretrained_cfg["num_classes"] == 7
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert timm.create_model("qlnet26n", num_classes=3,
                             pretrained_cfg_overlay=dict(num_classes=7)).num_classes == 3


# --- regularisation --------------------------------------------------------------------------

def test_no_drop_modules_by_default():
    model = timm.create_model("qlnet26n")
    assert model.drop_rate == model.drop_path_rate == 0.0
    assert all(isinstance(b.drop_path, nn.Identity) for b in _blocks(model))


@pytest.mark.parametrize("form", FORMS)
def test_drop_path_rate_rises_linearly_over_the_blocks(form):
    model = timm.create_model("qlnet26n", form=form, drop_path_rate=0.5, drop_rate=0.25)
    assert (model.drop_rate, model.drop_path_rate) == (0.25, 0.5)
    assert "drop" not in str(model.spec)  # regularisation is not architecture
    blocks = _blocks(model)
    expected = torch.linspace(0, 0.5, len(blocks)).tolist()
    assert isinstance(blocks[0].drop_path, nn.Identity)
    for block, rate in zip(blocks[1:], expected[1:], strict=True):
        assert isinstance(block.drop_path, DropPath)
        assert block.drop_path.drop_prob == pytest.approx(rate)
    assert blocks[-1].drop_path.drop_prob == pytest.approx(0.5)


@pytest.mark.parametrize("form", FORMS)
def test_drop_path_and_dropout_act_in_training_only(form):
    torch.manual_seed(0)
    plain = _prepared(timm.create_model("qlnet26n", form=form, num_classes=10))
    dropped = timm.create_model("qlnet26n", form=form, num_classes=10, drop_path_rate=0.5,
                                drop_rate=0.5)
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    plain.eval()
    dropped.eval()
    with torch.no_grad():
        _close(dropped(x), plain(x))

    dropped.train()
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outs.append(dropped.forward_features(x))
    _close(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2])  # residual branches dropped at random

    feats = torch.rand(8, dropped.num_features, 2, 2) + 0.1
    pooled = feats.mean((2, 3))
    head = dropped.forward_head(feats, pre_logits=True)
    kept = head != 0
    assert 0 < kept.float().mean() < 1
    _close(head[kept], 2 * pooled[kept])  # dropout after pooling, scaled by 1 / (1 - p)


@pytest.mark.parametrize("form", FORMS)
def test_drop_path_keeps_fuse_and_the_symmetry_toolkit(form):
    torch.manual_seed(0)
    model = timm.create_model("qlnet26n", form=form, act="softball", act_at="all",
                              widths=(16, 32, 64, 128), stem_width=32, num_classes=10,
                              drop_path_rate=0.3)
    model = _prepared(model).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _close(fuse(model)(x), model(x))
    rows = verify(model, "auto", trials=1, size=32, batch=1, per_stream=False)
    assert all(r.change < EXACT for r in rows), rows


# --- features and intermediates --------------------------------------------------------------

# Every variant with the four stages; a subset (with the stem) on the qlnet26n ones (CPU time).
FEATURES = [(n, (1, 2, 3, 4)) for n in ALL] + [(n, (0, 2)) for n in ALL
                                                if n.startswith("qlnet26n")]


@pytest.mark.parametrize("name,out_indices", FEATURES)
def test_features_only(name, out_indices):
    model = timm.create_model(name, features_only=True, out_indices=out_indices).eval()
    info = model.feature_info
    assert len(info.channels()) == len(out_indices)
    with torch.no_grad():
        feats = model(X)
    assert [f.shape[1] for f in feats] == info.channels()
    assert [64 // f.shape[-1] for f in feats] == info.reduction()


@pytest.mark.parametrize("name", ALL)
def test_forward_intermediates(name):
    model = _eval_model(name)
    logits, inter = _reference(name)
    assert [t.shape[1] for t in inter] == [f["num_chs"] for f in model.feature_info]
    assert [64 // t.shape[-1] for t in inter] == [f["reduction"] for f in model.feature_info]
    with torch.no_grad():
        _close(model.forward_features(X), inter[-1])
        only = model.forward_intermediates(X, indices=[1, -2], stop_early=True,
                                           intermediates_only=True)
        assert len(only) == 2
        _close(only[0], inter[1])
        _close(only[1], inter[3])
        if name.startswith("qlnet26n"):  # an int n: the last n (the others: one more pass each)
            last_two = model.forward_intermediates(X, indices=2, intermediates_only=True)
            _close(last_two[0], inter[3])
            _close(last_two[1], inter[4])
    with pytest.raises(ValueError, match="output_fmt='NHWC'"):
        model.forward_intermediates(X, output_fmt="NHWC")


@pytest.mark.parametrize("name", ALL)
def test_prune_intermediate_layers(name):
    full = _eval_model(name)
    _, want = _reference(name)
    model = copy.deepcopy(full)
    assert model.prune_intermediate_layers([1, 2]) == [1, 2]
    assert len(model.stages) == 2 and isinstance(model.fc, nn.Identity)
    assert model.num_features == full.feature_info[2]["num_chs"]
    with torch.no_grad():
        final, kept = model.forward_intermediates(X, indices=[1, 2])
        _close(kept[0], want[1])
        _close(kept[1], want[2])
        _close(model(X), final.mean((2, 3)))  # the head is pooling only now

    headless = copy.deepcopy(full)
    assert headless.prune_intermediate_layers(prune_head=False) == [4]
    assert len(headless.stages) == len(full.stages) and isinstance(headless.fc, nn.Linear)


def test_getter_feature_class_prunes_and_takes_intermediates():
    model = timm.create_model("qlnet26n_eq4_softball_ds", features_only=True,
                              out_indices=(1, 3), feature_cls="getter").eval()
    assert len(model.model.stages) == 3  # the last stage is not needed
    with torch.no_grad():
        feats = model(X)
    assert [f.shape[1] for f in feats] == model.feature_info.channels() == [32, 128]


# --- training tools --------------------------------------------------------------------------

def _saved_numel(model: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    count = [0]

    def pack(t):
        count[0] += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return count[0], out


# Every form and activation at qlnet26n, and the other two sizes once: two training steps per
# model are the slowest check here (CPU, 2 cores), and checkpointing does not depend on width.
CHECKPOINTED = [n for n in ALL if n.startswith("qlnet26n")] + ["qlnet26", "qlnet50"]


@pytest.mark.parametrize("name", CHECKPOINTED)
def test_grad_checkpointing_same_output_and_gradients(name):
    torch.manual_seed(0)
    plain = _prepared(timm.create_model(name, num_classes=10)).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 64)
    saved_plain, out_plain = _saved_numel(plain, x)
    saved_ckpt, out_ckpt = _saved_numel(ckpt, x)
    assert saved_ckpt < saved_plain / 2  # activations are recomputed, not kept
    out_plain.square().mean().backward()
    out_ckpt.square().mean().backward()
    _close(out_ckpt, out_plain)
    for (key, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=key)
    _, inter = ckpt.forward_intermediates(x)
    assert inter[-1].requires_grad


@pytest.mark.parametrize("name", ALL)
def test_layer_decay_gives_one_lr_per_block(name):
    model = timm.create_model(name)
    blocks = sum(model.spec.depths)
    opt = create_optimizer_v2(model, "sgd", lr=0.1, layer_decay=0.7)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    assert len(set(scale.values())) == blocks + 2  # the stem, each block, the head
    assert scale[id(model.stem.conv.weight)] == pytest.approx(0.7 ** (blocks + 1))
    assert scale[id(model.fc.weight)] == 1.0
    per_block = [scale[id(b.dw.weight)] for b in _blocks(model)]
    assert per_block == sorted(per_block) and len(set(per_block)) == blocks
    coarse = group_parameters(model, model.group_matcher(coarse=True))
    assert len(coarse) == len(model.spec.depths) + 2  # the stem, each stage, the head


# --- TorchScript and FX ----------------------------------------------------------------------

@NO_JIT_WARNING
@pytest.mark.parametrize("name", ALL)
def test_torchscript_matches_eager(name):
    scripted = torch.jit.script(_eval_model(name))
    with torch.no_grad():
        _close(scripted(X), _reference(name)[0])


@pytest.mark.parametrize("name", ALL)
def test_fx_trace_matches_eager(name):
    traced = torch.fx.symbolic_trace(_eval_model(name))
    with torch.no_grad():
        _close(traced(X), _reference(name)[0])


@NO_JIT_WARNING
def test_fx_feature_class_and_fused_model_trace_and_script():
    model = timm.create_model("qlnet26n_eq3_softball_ds", features_only=True,
                              out_indices=(0, 2, 4), feature_cls="fx").eval()
    with torch.no_grad():
        feats = model(X)
    assert [f.shape[1] for f in feats] == model.feature_info.channels() == [64, 64, 256]
    fused = fuse(_eval_model("qlnet26n_eq4_softball_ds"))
    with torch.no_grad():
        _close(torch.jit.script(fused)(X), fused(X))
        _close(torch.fx.symbolic_trace(fused)(X), fused(X))


# --- pretrained config -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_pretrained_cfg(name):
    model = _eval_model(name)
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg
    assert cfg["num_classes"] == 1000 and cfg["input_size"] == (3, 224, 224)
    assert 0 < cfg["crop_pct"] <= 1 and len(cfg["mean"]) == len(cfg["std"]) == 3
    first = model.get_submodule(cfg["first_conv"])
    assert isinstance(first, nn.Conv2d) and first.in_channels == 3
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
    assert model.get_classifier(name_only=True) == cfg["classifier"]
    data = resolve_data_config({}, model=model)
    assert data["input_size"] == (3, 224, 224) and data["crop_pct"] == cfg["crop_pct"]
