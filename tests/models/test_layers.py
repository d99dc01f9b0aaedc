"""The activations and the shared-weight depthwise conv."""

import math

import pytest
import torch
import torch.nn.functional as F

from qlnas.models.layers import DepthwiseConv3x3, HardBall, SoftBall, create_act


@pytest.mark.parametrize("expand", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
def test_shared_dw_equals_repeat_formulation(expand, stride):
    torch.manual_seed(0)
    n, k = 6, 4
    conv = DepthwiseConv3x3(n, k, shared=True, stride=stride, expand=expand)
    x = torch.randn(3, n if expand else n * k, 9, 9)
    repeated = conv.weight.repeat(n, 1, 1, 1)  # (n*k, 1, 3, 3)
    groups = n if expand else n * k
    ref = F.conv2d(x, repeated, None, stride, 1, 1, groups)
    torch.testing.assert_close(conv(x), ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(conv.full_weight(), repeated)


def test_hardball_clips_norm():
    act = HardBall(channels=4)
    assert act.radius == 2.0
    x = torch.randn(5, 4, 3, 3) * 10
    y = act(x)
    norms = torch.linalg.vector_norm(y, dim=1)
    assert torch.all(norms <= 2.0 + 1e-5)
    small = x / torch.linalg.vector_norm(x, dim=1, keepdim=True)  # norm 1 < R
    torch.testing.assert_close(act(small), small)


def test_softball_formula_and_radius_override():
    act = SoftBall(channels=9, radius=1.5)
    x = torch.randn(2, 9, 4, 4)
    expect = x / torch.sqrt(1 + x.pow(2).sum(1, keepdim=True) / 1.5**2)
    torch.testing.assert_close(act(x), expect)
    assert SoftBall(16).radius == math.sqrt(16)


def test_factory():
    assert isinstance(create_act("hardball", 4), HardBall)
    assert torch.equal(create_act("hardtanh", 4)(torch.tensor([-3.0, 0.5, 2.0])),
                       torch.tensor([-1.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        create_act("gelu", 4)
