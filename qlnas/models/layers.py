"""Layers of the QL-ConvNets: the radial activations, their factory, the depthwise 3x3 conv."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Proxy
from torch.utils._python_dispatch import _get_current_dispatch_mode

from qlnas.models import native

_REFERENCE = False


def set_reference(enabled: bool) -> None:
    """Select the reference (True) or the fast (False, default) forward of the layers/blocks.

    Both compute the same function; the reference is the plain transcription of the equations
    and stays selectable so tests (and ``qlnas bench train-step --reference``) can compare.
    """
    global _REFERENCE
    _REFERENCE = bool(enabled)


def use_reference() -> bool:
    return _REFERENCE


@contextlib.contextmanager
def reference_path(enabled: bool = True) -> Iterator[None]:
    """Within the block, layers and blocks run their reference forward."""
    previous = _REFERENCE
    set_reference(enabled)
    try:
        yield
    finally:
        set_reference(previous)


def symbolic(x: torch.Tensor) -> bool:
    """Is `x` an FX proxy (``torch.fx.symbolic_trace``)? A trace records the plain ops."""
    return isinstance(x, Proxy)


def _mkldnn_fusable(conv: nn.Module, x: torch.Tensor, other: torch.Tensor) -> bool:
    """Can conv(x) * other run as one oneDNN conv with a multiply post-op (CPU inference)?"""
    # is_compiling first: torch.compile must not trace mkldnn.is_available (a graph break).
    return (not torch.compiler.is_compiling() and not _REFERENCE and not symbolic(x)
            and isinstance(conv, nn.Conv2d) and x.device.type == "cpu"
            and x.dtype == torch.float32 and other.dtype == torch.float32
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and torch.backends.mkldnn.is_available()
            and _get_current_dispatch_mode() is None  # FLOP counters see the plain ops
            and _no_autograd(x, other, conv.weight))


def _triton_dw(x: torch.Tensor):
    """The Triton kernels' module when selected for `x` (``QLNAS_TRITON=1``, CUDA), else None."""
    if (_REFERENCE or os.environ.get("QLNAS_TRITON", "0") != "1" or symbolic(x)
            or torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None):
        return None
    from qlnas.models import triton_dw  # imports triton: only when asked for

    return triton_dw if triton_dw.runs_on(x) else None


def _no_autograd(*tensors: torch.Tensor) -> bool:
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


class FoldedDepthwise(nn.Conv2d):
    """A 3x3 depthwise conv with a channel multiplier and a bias: a BN folded into the QL
    blocks' ``dw`` (`qlnas.models.fuse`). At CPU inference it runs on the native kernel, on
    CUDA on the Triton one when selected (``QLNAS_TRITON=1``)."""

    def fast_kernel(self, x: torch.Tensor, *others: torch.Tensor):
        """`native` or `triton_dw` when one applies to these tensors, else None."""
        if symbolic(x):
            return None
        if self.out_channels == self.in_channels or not _no_autograd(x, self.weight, *others):
            return None
        tri = _triton_dw(x)
        if tri is not None:
            return tri
        return native if not _REFERENCE and native.eligible(x, self.weight, *others) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._conv_forward(x, self.weight, self.bias)
        kernel = self.fast_kernel(x)
        if kernel is not None:
            return kernel.depthwise3x3_mul(x, self.weight, self.bias, None, self.stride[0])
        return super().forward(x)


def conv_mul(conv: nn.Module, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """conv(x) * other: the product the QL blocks compute next to a conv.

    On CPU without autograd it is one pass: the native kernel's epilogue for a folded
    depthwise conv, else one oneDNN convolution whose multiply is a post-op, so the conv's
    output is never written and read back (a fused model's BN is already in the conv's bias).
    Elsewhere (training, CUDA, torch.compile, the reference path) it is the plain expression,
    which torch.compile fuses by itself.
    """
    kernel = conv.fast_kernel(x, other) if isinstance(conv, FoldedDepthwise) else None
    if kernel is not None:
        return kernel.depthwise3x3_mul(x, conv.weight, conv.bias, other, conv.stride[0])
    if _mkldnn_fusable(conv, x, other):
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, other, conv.weight, conv.bias, list(conv.padding), list(conv.stride),
            list(conv.dilation), conv.groups, "mul", None, None, [], None)
    return conv(x) * other


class HardBall(nn.Module):
    """Radial clip: x if |x| < R else R x / |x|, |x| the Euclidean norm over channels."""

    def __init__(self, channels: int, radius: float | None = None) -> None:
        super().__init__()
        self.radius = float(radius) if radius is not None else math.sqrt(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        return x * (self.radius / norm.clamp_min(self.radius))

    def extra_repr(self) -> str:
        return f"radius={self.radius:.4g}"


class SoftBall(nn.Module):
    """Smooth radial squashing: x / sqrt(1 + |x|^2 / R^2), norm over channels."""

    def __init__(self, channels: int, radius: float | None = None) -> None:
        super().__init__()
        self.radius = float(radius) if radius is not None else math.sqrt(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sq = x.pow(2).sum(dim=1, keepdim=True)
        return x * torch.rsqrt(1.0 + sq / self.radius**2)

    def extra_repr(self) -> str:
        return f"radius={self.radius:.4g}"


def create_act(name: str, channels: int, radius: float | None = None) -> nn.Module:
    """Build an activation by name, so configs can name them."""
    if name == "none":
        return nn.Identity()
    if name == "relu":
        return nn.ReLU(inplace=False)
    if name == "hardtanh":
        return nn.Hardtanh(-1.0, 1.0)
    if name == "hardball":
        return HardBall(channels, radius)
    if name == "softball":
        return SoftBall(channels, radius)
    raise ValueError(
        f"unknown activation {name!r}; allowed: none, relu, hardtanh, hardball, softball"
    )


class DepthwiseConv3x3(nn.Module):
    """3x3 depthwise conv that makes k copies of each of n channels (output channel j*k + c).

    ``expand=True``: input n channels -> output n*k (groups=n, multiplier k).
    ``expand=False``: input already n*k channels, one 3x3 per channel.
    ``shared=True``: one kernel per copy c, shared by every channel j. It is applied with the
    channels folded into the batch, so the repeated (n*k, 1, 3, 3) weight never exists.
    """

    def __init__(self, channels: int, k: int, shared: bool, stride: int = 1,
                 expand: bool = True) -> None:
        super().__init__()
        self.channels, self.k, self.shared = channels, k, shared
        self.stride, self.expand = stride, expand
        if shared:
            self.weight = nn.Parameter(torch.empty(k, 1, 3, 3))
        else:
            self.weight = nn.Parameter(torch.empty(channels * k, 1, 3, 3))
        nn.init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="linear")

    def full_weight(self) -> torch.Tensor:
        """The (n*k, 1, 3, 3) weight of the equivalent grouped conv."""
        return self.weight.repeat(self.channels, 1, 1, 1) if self.shared else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.channels, self.k
        groups = n if self.expand else n * k
        if torch.jit.is_scripting():
            return F.conv2d(x, self.full_weight(), None, self.stride, 1, 1, groups)
        if _REFERENCE:
            if not self.shared:
                return F.conv2d(x, self.weight, None, self.stride, 1, 1, groups)
            return self._forward_folded(x)
        # Fast path: one grouped conv with the kernel repeated over the channels. The repeat
        # is 9 n k numbers (at most 74 KB), against activations of tens of MB, and the
        # backward sums its gradient back onto the k shared kernels; oneDNN's and cuDNN's
        # depthwise kernels are 3-6x faster than the folded conv (1 input channel, batch b n).
        return self._conv(x, self.full_weight(), groups)

    def runs_native(self, x: torch.Tensor) -> bool:
        """Does the fast forward run on the native CPU kernel for `x`?

        A channel multiplier above 1 does where it can (oneDNN's generic grouped conv is 2-3x
        slower); multiplier 1 is oneDNN's own depthwise kernel.
        """
        return (self.expand and self.k > 1 and not _REFERENCE and not symbolic(x)
                and _triton_dw(x) is None and native.eligible(x, self.weight))

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
        if self.expand and self.k > 1 and not symbolic(x):
            tri = _triton_dw(x)
            if tri is not None:
                return tri.depthwise3x3(x, weight, self.stride)
        if self.runs_native(x):
            return native.depthwise3x3(x, weight, self.k, self.stride)
        return F.conv2d(x, weight, None, self.stride, 1, 1, groups)

    def _forward_folded(self, x: torch.Tensor) -> torch.Tensor:
        """Reference: the channels folded into the batch, so the shared kernel is used as is."""
        n, k = self.channels, self.k
        b, _, h, w = x.shape
        cin = 1 if self.expand else k
        y = F.conv2d(x.reshape(b * n, cin, h, w), self.weight, None, self.stride, 1, 1,
                     1 if self.expand else k)
        return y.reshape(b, n * k, y.shape[-2], y.shape[-1])

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, k={self.k}, shared={self.shared}, "
                f"stride={self.stride}, expand={self.expand}")
