"""The native CPU depthwise kernel computes what PyTorch's grouped conv computes.

It runs in float32 only, so these tests compare in float32 (the float64 tests of
test_fast_paths.py see PyTorch's conv on the fast path).
"""

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qlnas  # noqa: F401
from qlnas.models import fuse, native
from qlnas.models.blocks import BLOCKS
from qlnas.models.layers import DepthwiseConv3x3, FoldedDepthwise
from tests.models.test_fast_paths import SMALL, perturbed, step_errors


def test_kernel_builds_here():
    # CI and `make setup` have a compiler; a silent fallback would hide a broken kernel.
    assert native.library() is not None
    assert native.eligible(torch.zeros(1))


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("channels_last", [True, False], ids=["cl", "nchw"])
@pytest.mark.parametrize("n,k,stride,h,w", [
    (6, 4, 1, 9, 9), (6, 4, 2, 9, 9), (5, 2, 1, 7, 11), (5, 2, 2, 8, 5), (3, 6, 2, 6, 7),
    (11, 3, 1, 4, 4), (64, 4, 1, 8, 8), (40, 4, 2, 5, 6), (1, 4, 1, 1, 1),
    # 16 and 48 channels (whole vectors, and a 16-channel block after 32), widths that leave
    # one to three pixels after the four-pixel steps, 1024 channels (the padded pixel stride)
    (8, 2, 1, 5, 13), (12, 4, 1, 6, 18), (12, 4, 2, 7, 14), (256, 4, 1, 3, 5),
    (256, 4, 2, 4, 3),
])
def test_depthwise_forward_and_gradients(n, k, stride, h, w, channels_last):
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, n, h, w).contiguous(memory_format=fmt).requires_grad_(True)
    weight = torch.randn(n * k, 1, 3, 3, requires_grad=True)
    expect = F.conv2d(x, weight, None, stride, 1, 1, n)
    gy = torch.randn_like(expect)
    egx, egw = torch.autograd.grad(expect, (x, weight), gy)
    got = native.depthwise3x3(x, weight, k, stride)
    assert got.shape == expect.shape
    gx, gw = torch.autograd.grad(got, (x, weight), gy)
    for a, b in ((got, expect), (gx, egx), (gw, egw)):
        assert max_rel(a, b) < 1e-5


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_bias_and_product_in_one_pass(stride):
    torch.manual_seed(1)
    n, k = 12, 4
    x = torch.randn(2, n, 10, 10).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(n * k, 1, 3, 3), torch.randn(n * k)
    plain = F.conv2d(x, weight, bias, stride, 1, 1, n)
    other = torch.randn_like(plain)
    torch.testing.assert_close(native.depthwise3x3_mul(x, weight, bias, other, stride),
                               plain * other, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(native.depthwise3x3_mul(x, weight, bias, None, stride), plain,
                               atol=1e-5, rtol=1e-5)


def bn_pair(channels: int) -> tuple[nn.BatchNorm2d, nn.BatchNorm2d]:
    """Two equal train-mode BNs with a non-trivial affine and running state."""
    torch.manual_seed(2)
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    return bn, copy.deepcopy(bn)


def assert_same_bn_state(bn: nn.BatchNorm2d, ref: nn.BatchNorm2d) -> None:
    torch.testing.assert_close(bn.running_mean, ref.running_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.running_var, ref.running_var, atol=1e-5, rtol=1e-5)
    assert bn.num_batches_tracked.item() == ref.num_batches_tracked.item() == 1


@pytest.mark.parametrize("offset", [0.0, 300.0], ids=["centred", "large-mean"])
def test_bn_mul_matches_batchnorm_then_product(offset):
    torch.manual_seed(3)
    bn, ref = bn_pair(40)
    y = (torch.randn(4, 40, 6, 7) + offset).contiguous(memory_format=torch.channels_last)
    y.requires_grad_(True)
    c = torch.randn(4, 40, 6, 7, requires_grad=True)
    gp = torch.randn(4, 40, 6, 7)
    got = native.bn_mul(bn, y, c)
    expect = ref(y) * c
    grads = torch.autograd.grad(got, (y, c, bn.weight, bn.bias), gp)
    egrads = torch.autograd.grad(expect, (y, c, ref.weight, ref.bias), gp)
    for a, b in ((got, expect), *zip(grads, egrads, strict=True)):
        assert max_rel(a, b) < 1e-4
    assert_same_bn_state(bn, ref)


@pytest.mark.parametrize("shared", [False, True], ids=["own", "shared"])
@pytest.mark.parametrize("n,k,stride,h,w", [
    (6, 4, 1, 9, 9), (6, 4, 2, 9, 9), (5, 2, 1, 7, 11), (12, 4, 1, 6, 18), (3, 6, 2, 6, 7),
    (256, 4, 1, 3, 5),
])
def test_conv_bn_and_product_in_one_op_match_the_plain_ops(n, k, stride, h, w, shared):
    # Eq.(3)/(5) training: bn_dw(dw(u)) * C(u) runs as one native op whose backward makes the
    # BN's gradient as the conv's backward reads it; it must equal the three plain ops.
    torch.manual_seed(4)
    dw = DepthwiseConv3x3(n, k, shared=shared, stride=stride)
    bn, ref_bn = bn_pair(n * k)
    u = (torch.randn(3, n, h, w) + 2.0).contiguous(memory_format=torch.channels_last)
    u.requires_grad_(True)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    c = torch.randn(3, n * k, ho, wo, requires_grad=True)
    gp = torch.randn(3, n * k, ho, wo)
    got = native.dw_bn_mul(u, dw.full_weight(), k, stride, bn, c)
    assert got.grad_fn.name() == "_DwBnMulFnBackward"
    expect = ref_bn(F.conv2d(u, dw.full_weight(), None, stride, 1, 1, n)) * c
    inputs = (u, dw.weight, c, bn.weight, bn.bias)
    grads = torch.autograd.grad(got, inputs, gp)
    egrads = torch.autograd.grad(expect, (u, dw.weight, c, ref_bn.weight, ref_bn.bias), gp)
    for a, b in ((got, expect), *zip(grads, egrads, strict=True)):
        assert max_rel(a, b) < 1e-4
    assert_same_bn_state(bn, ref_bn)


def test_conv_bn_and_product_without_the_input_gradient():
    # The stem's output, or a frozen trunk: no gradient for u, only for the weights.
    torch.manual_seed(5)
    dw = DepthwiseConv3x3(8, 4, shared=False)
    bn, ref_bn = bn_pair(32)
    u = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    c = torch.randn(2, 32, 5, 5)
    got = native.dw_bn_mul(u, dw.weight, 4, 1, bn, c)
    expect = ref_bn(F.conv2d(u, dw.weight, None, 1, 1, 1, 8)) * c
    (gw,) = torch.autograd.grad(got.square().sum(), (dw.weight,))
    (egw,) = torch.autograd.grad(expect.square().sum(), (dw.weight,))
    assert max_rel(gw, egw) < 1e-4


@pytest.mark.parametrize("form", ["eq3", "eq5"])
def test_blocks_train_on_the_one_op(form):
    block = BLOCKS[form](8, 8, 1, 4, False, "softball", None).train()
    u = torch.randn(2, 8, 6, 6, requires_grad=True)
    seen = []
    block.bn_dw.register_forward_hook(lambda *_: seen.append("bn_dw"))  # the module BN: not run
    out = block.residual(u)
    names, fn = set(), out.grad_fn
    stack = [fn]
    while stack:
        fn = stack.pop()
        if fn is not None and fn.name() not in names:
            names.add(fn.name())
            stack.extend(f for f, _ in fn.next_functions)
    assert "_DwBnMulFnBackward" in names and not seen


@pytest.mark.parametrize("shared", [True, False])
def test_layer_uses_the_kernel_only_where_it_applies(shared):
    x = torch.randn(2, 4, 6, 6)
    expand = DepthwiseConv3x3(4, 4, shared=shared)
    assert expand(x).grad_fn.name().startswith("_DepthwiseFn")
    per_channel = DepthwiseConv3x3(4, 4, shared=shared, expand=False)  # oneDNN's own kernel
    assert "Depthwise" not in per_channel(torch.randn(2, 16, 6, 6)).grad_fn.name()
    as_double = expand.double()(x.double())  # float64: PyTorch's conv
    assert "Depthwise" not in as_double.grad_fn.name()


@pytest.mark.parametrize("name", SMALL)
def test_train_step_matches_reference_in_float32(name):
    model = perturbed(name).train()
    # Batch 8: train-mode BN over fewer samples amplifies fp32 rounding through the blocks.
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    out_err, grad_err = step_errors(model, x)
    assert out_err < 1e-4 and grad_err < 1e-3


def test_fused_model_runs_the_kernel():
    fused = fuse(perturbed("qlnet26n_eq3_softball_ds").eval())
    folded = [m for m in fused.modules() if isinstance(m, FoldedDepthwise)]
    assert folded
    assert all(m.fast_kernel(torch.zeros(1, m.in_channels, 4, 4)) is native for m in folded)


def test_switched_off_the_model_still_trains():
    code = ("import torch, timm, qlnas; from qlnas.models import native; "
            "m = timm.create_model('qlnet26n_eq3_softball_ds', num_classes=3); "
            "m(torch.randn(2, 3, 32, 32)).sum().backward(); "
            "print(native.library() is None)")
    env = dict(os.environ, QLNAS_NATIVE="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "True"
