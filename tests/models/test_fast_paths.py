"""The fast forward of every layer and block computes the same function as the reference.

The reference (`qlnas.models.layers.reference_path`) is the plain transcription of the
equations; the fast paths are the shared depthwise conv as one grouped conv and, at CPU
inference, the product fused into the conv next to it.
"""

import pytest
import timm
import torch
import torch.nn.functional as F

import qlnas  # noqa: F401
from qlnas.models import fuse
from qlnas.models.layers import DepthwiseConv3x3, conv_mul, reference_path, use_reference
from tests.models.test_fuse import randomise_bn, rel_err

ALL = timm.list_models("qlnet*")
# Every form, activation, sharing and expansion at the small size (the paths are per block,
# so the depth and width of qlnet50 add run time, not cases), plus the Eq.(3) Table 1 row.
SMALL = timm.list_models("qlnet26n_*") + ["qlnet50_eq3_softball_ds"]


def perturbed(name: str) -> torch.nn.Module:
    """A model whose blocks are not the identity (the zero-initialised last BNs are set)."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    randomise_bn(model)
    return model


def train_step_outputs(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def step_errors(model, x) -> tuple[float, float]:
    """(output error, worst gradient error) of a training step, fast path vs reference.

    Some gradients are zero in exact arithmetic (a BN's bias before a train-mode BN): their
    error is measured against 1e-3 of the largest gradient.
    """
    with reference_path():
        ref_out, ref_grads = train_step_outputs(model, x)
    out, grads = train_step_outputs(model, x)
    floor = max(g.norm().item() for g in ref_grads.values())
    worst = max((g - ref_grads[key]).norm().item() / max(ref_grads[key].norm().item(),
                                                           floor * 1e-3)
                for key, g in grads.items())
    return rel_err(out, ref_out), worst


def test_reference_path_is_a_scoped_switch():
    assert not use_reference()
    with reference_path():
        assert use_reference()
    assert not use_reference()


@pytest.mark.parametrize("name", SMALL)
def test_train_step_matches_reference(name):
    # float64: train-mode BN over a batch of 2 amplifies fp32 rounding through 16 blocks, so
    # only double precision separates "same function" from "nearly the same".
    model = perturbed(name).train().double()
    out_err, grad_err = step_errors(model, torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert out_err < 1e-12 and grad_err < 1e-10


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("name", SMALL)
def test_fused_inference_matches_reference(name, channels_last):
    model = perturbed(name).eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 3, 48, 48).contiguous(memory_format=fmt)
    with torch.no_grad(), reference_path():
        ref = model(x)
    fast = fuse(model).to(memory_format=fmt)
    with torch.inference_mode():
        out = fast(x)
    # fp32 (the fused oneDNN op has no float64): different conv kernels round differently.
    assert rel_err(out, ref) < 2e-5


@pytest.mark.parametrize("expand", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shared", [True, False])
def test_depthwise_fast_equals_folded(expand, stride, shared):
    torch.manual_seed(0)
    n, k = 6, 4
    conv = DepthwiseConv3x3(n, k, shared=shared, stride=stride, expand=expand).double()
    x = torch.randn(3, n if expand else n * k, 9, 9, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(3, n * k, (9 - 1) // stride + 1, (9 - 1) // stride + 1,
                     dtype=torch.float64)
    results = []
    for ref in (True, False):
        with reference_path(ref):
            y = conv(x)
        gx, gw = torch.autograd.grad(y, (x, conv.weight), gy)
        results.append((y, gx, gw))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("stride,groups,ksize", [(1, 8, 3), (2, 8, 3), (1, 1, 1), (2, 1, 1)])
def test_conv_mul_equals_conv_then_multiply(stride, groups, ksize, channels_last):
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    conv = torch.nn.Conv2d(8, 16, ksize, stride=stride, padding=ksize // 2, groups=groups)
    x = torch.randn(2, 8, 11, 11).contiguous(memory_format=fmt)
    other = torch.randn(2, 16, 11 // stride + (11 % stride), 11 // stride + (11 % stride))
    other = other.contiguous(memory_format=fmt)
    expect = F.conv2d(x, conv.weight, conv.bias, stride, ksize // 2, 1, groups) * other
    with torch.inference_mode():
        got = conv_mul(conv, x, other)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)
    # With autograd the plain expression runs, and gradients flow.
    conv_mul(conv, x, other).sum().backward()
    assert conv.weight.grad is not None
