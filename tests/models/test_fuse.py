"""BN folding: `fuse(model)` computes what the eval-mode model computes, for every variant."""

import pytest
import timm
import torch

import qlnas  # noqa: F401
from qlnas.models import fuse
from qlnas.models.fuse import ChannelBias

# Every form and activation at the small size, plus the full-size Eq.(3).
ALL = timm.list_models("qlnet26n_*") + ["qlnet50_eq3_softball_ds"]


def randomise_bn(model: torch.nn.Module) -> None:
    """Trained-looking BN: random scales, shifts and running statistics (not the identity)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                c = mod.num_features
                # Scales below 1 keep the products of 16 blocks without activation finite.
                mod.weight.copy_(torch.rand(c, generator=g) * 0.4 + 0.3)
                mod.bias.copy_(torch.randn(c, generator=g) * 0.1)
                mod.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(c, generator=g) + 0.5)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", ALL)
def test_fuse_matches_eval_model(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    randomise_bn(model)
    model.eval()
    x = torch.randn(2, 3, 48, 48)
    fused = fuse(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    with torch.no_grad():
        ref, out = model(x), fused(x)
        # Features too: the logits alone could hide a broken block behind the pooling.
        feat_err = rel_err(fused.forward_features(x), model.forward_features(x))
    assert rel_err(out, ref) < 1e-5
    assert feat_err < 1e-5


@pytest.mark.parametrize("name", ["qlnet26n_eq4_softball_ds", "qlnet50_eq3_softball_ds",
                                  "qlnet26n_glb_none", "qlnet26n_eq7_nows_x6_softball_ds"])
def test_fuse_is_exact_in_float64(name):
    """In double precision the folded model is the same function to 1e-12."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    randomise_bn(model)
    model = model.double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(fuse(model)(x), model(x)) < 1e-12


def test_fuse_leaves_the_model_alone_and_folds_eq4_bn_after_the_product():
    model = timm.create_model("qlnet26n_eq4_softball_ds", num_classes=4)
    keys = list(model.state_dict())
    fused = fuse(model.train())
    assert model.training and list(model.state_dict()) == keys
    assert not fused.training
    assert isinstance(fused.stages[0][0].bn_out, ChannelBias)


def test_fuse_rejects_other_models():
    with pytest.raises(TypeError, match="QLNet"):
        fuse(torch.nn.Conv2d(3, 3, 1))
