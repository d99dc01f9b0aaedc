"""QL-ConvNet blocks: one explicit step u <- act(u + F(u)) of du/dt = A(u) du/dx + B(u) du/dy.

The 3x3 depthwise conv plays the spatial derivatives, 1x1 convs the coefficient matrices and
an element-wise product of two branches is the only nonlinearity inside F. Module names are
shared by all forms so the symmetry toolkit can find them:

- ``dw`` / ``bn_dw``: the 3x3 depthwise conv (n -> k n copies) and the BN after it;
- ``coef``: the 1x1 conv that reads the stream u (the coefficient matrices C, or P1 and P2),
  ``bn_coef`` the BN after it (identity unless the spec asks for ``coef_bn``);
- ``proj``: the 1x1 conv that writes the block's output (A), ``bn_out`` the BN after it;
- ``shortcut``: identity, or a 1x1 conv + BN projection where width or stride change;
- ``act``: the activation on the stream after the residual add (or identity);
- ``drop_path``: stochastic depth on F(u) before the add (identity at rate 0 and in eval).

TorchScript compiles the plain PyTorch expressions (the ``torch.jit.is_scripting()``
branches), FX traces the same ops (the fast kernels step aside for proxies): the native and
Triton kernels are for eager mode only.
"""

from __future__ import annotations

import torch
from timm.layers import DropPath
from torch import nn

from qlnas.models import native
from qlnas.models.layers import DepthwiseConv3x3, conv_mul, create_act, symbolic, use_reference


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class Shortcut(nn.Module):
    """1x1 strided conv + BN projection of the skip path."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv = conv1x1(cin, cout, stride)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class QLBlock(nn.Module):
    """Base: the skip path, the stream activation and the residual update."""

    form = ""

    def __init__(self, n: int, m: int, stride: int, k: int, shared: bool, act: str,
                 radius: float | None, drop_path: float = 0.0, coef_bn: bool = False) -> None:
        super().__init__()
        self.n, self.m, self.stride, self.k = n, m, stride, k
        self.coef_bn = coef_bn
        self.shortcut = Shortcut(n, m, stride) if (stride != 1 or n != m) else nn.Identity()
        self.act = create_act(act, m, radius)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def residual(self, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _bn_coef(self, channels: int) -> nn.Module:
        return nn.BatchNorm2d(channels) if self.coef_bn else nn.Identity()

    def coefficients(self, u: torch.Tensor) -> torch.Tensor:
        """bn_coef(coef(u)): the coefficient conv and its BN."""
        return self.bn_coef(self.coef(u))

    def last_bn(self) -> nn.BatchNorm2d:
        """The BN whose scale is zero-initialised so the block starts as the identity."""
        return self.bn_out

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.act(self.shortcut(u) + self.drop_path(self.residual(u)))

    def dw_times(self, u: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """bn_dw(dw(u)) * other: one pass at inference once BN is folded (`fuse`), and the
        conv, the BN and the product in one native op in CPU training."""
        if torch.jit.is_scripting():
            return self.bn_dw(self.dw(u)) * other
        if isinstance(self.bn_dw, nn.Identity):
            return conv_mul(self.dw, u, other)
        dw = self.dw
        if dw.runs_native(u) and native.bn_mul_fusable(self.bn_dw, u, other):
            return native.dw_bn_mul(u, dw.full_weight(), dw.k, dw.stride, self.bn_dw, other)
        y = dw(u)
        if not (use_reference() or symbolic(y)) and native.bn_mul_fusable(self.bn_dw, y, other):
            return native.bn_mul(self.bn_dw, y, other)
        return self.bn_dw(y) * other


class Eq3Block(QLBlock):
    """F(u) = A( dw(u) * C(u) ), C: n -> k n, A: k n -> m."""

    form = "eq3"

    def __init__(self, n, m, stride, k, shared, act, radius, drop_path=0.0, coef_bn=False):
        super().__init__(n, m, stride, k, shared, act, radius, drop_path, coef_bn)
        self.dw = DepthwiseConv3x3(n, k, shared, stride)
        self.bn_dw = nn.BatchNorm2d(k * n)
        self.coef = conv1x1(n, k * n, stride)
        self.bn_coef = self._bn_coef(k * n)
        self.proj = conv1x1(k * n, m)
        self.bn_out = nn.BatchNorm2d(m)

    def residual(self, u):
        return self.bn_out(self.proj(self.dw_times(u, self.coefficients(u))))


class Eq4Block(QLBlock):
    """F(u) = C(u) * A(dw(u)), C: n -> m, A: k n -> m."""

    form = "eq4"

    def __init__(self, n, m, stride, k, shared, act, radius, drop_path=0.0, coef_bn=False):
        super().__init__(n, m, stride, k, shared, act, radius, drop_path, coef_bn)
        self.dw = DepthwiseConv3x3(n, k, shared, stride)
        self.bn_dw = nn.BatchNorm2d(k * n)
        self.coef = conv1x1(n, m, stride)
        self.bn_coef = self._bn_coef(m)
        self.proj = conv1x1(k * n, m)
        self.bn_out = nn.BatchNorm2d(m)

    def residual(self, u):
        y, c = self.bn_dw(self.dw(u)), self.coefficients(u)
        if torch.jit.is_scripting():
            return self.bn_out(self.proj(y) * c)
        return self.bn_out(conv_mul(self.proj, y, c))


class Eq5Block(QLBlock):
    """Per channel, the sum over its k copies of dw(u) * C(u); no output 1x1, no end BN.

    Channel j's k copies are summed into m/n output channels (one when m = n, two at
    downsampling), so channel j of one stage feeds channels 2j, 2j+1 of the next.
    """

    form = "eq5"

    def __init__(self, n, m, stride, k, shared, act, radius, drop_path=0.0, coef_bn=False):
        super().__init__(n, m, stride, k, shared, act, radius, drop_path, coef_bn)
        self.dw = DepthwiseConv3x3(n, k, shared, stride)
        self.bn_dw = nn.BatchNorm2d(k * n)
        self.coef = conv1x1(n, k * n, stride)
        self.bn_coef = self._bn_coef(k * n)

    def last_bn(self):
        return self.bn_dw

    def residual(self, u):
        p = self.dw_times(u, self.coefficients(u))
        b, c, h, w = p.shape
        return p.reshape(b, self.m, c // self.m, h, w).sum(2)


class Eq6Block(QLBlock):
    """w = u * C(u) with C: n -> n, then F(u) = A(dw(w))."""

    form = "eq6"

    def __init__(self, n, m, stride, k, shared, act, radius, drop_path=0.0, coef_bn=False):
        super().__init__(n, m, stride, k, shared, act, radius, drop_path, coef_bn)
        self.coef = conv1x1(n, n)
        self.bn_coef = self._bn_coef(n)
        self.dw = DepthwiseConv3x3(n, k, shared, stride)
        self.bn_dw = nn.BatchNorm2d(k * n)
        self.proj = conv1x1(k * n, m)
        self.bn_out = nn.BatchNorm2d(m)

    def residual(self, u):
        if torch.jit.is_scripting() or self.coef_bn:
            w = self.coefficients(u) * u
        else:
            w = conv_mul(self.coef, u, u)
        return self.bn_out(self.proj(self.bn_dw(self.dw(w))))


class Eq7Block(QLBlock):
    """w_{j,c} = u_j (C_c u)_j with C: n -> k n; per-channel dw k n -> k n; A: k n -> m."""

    form = "eq7"

    def __init__(self, n, m, stride, k, shared, act, radius, drop_path=0.0, coef_bn=False):
        super().__init__(n, m, stride, k, shared, act, radius, drop_path, coef_bn)
        self.coef = conv1x1(n, k * n)
        self.bn_coef = self._bn_coef(k * n)
        self.dw = DepthwiseConv3x3(n, k, shared, stride, expand=False)
        self.bn_dw = nn.BatchNorm2d(k * n)
        self.proj = conv1x1(k * n, m)
        self.bn_out = nn.BatchNorm2d(m)

    def residual(self, u):
        c = self.coefficients(u)
        b, _, h, w = u.shape
        wjc = (u.unsqueeze(2) * c.reshape(b, self.n, self.k, h, w)).reshape(b, -1, h, w)
        return self.bn_out(self.proj(self.bn_dw(self.dw(wjc))))


class GLBlock(QLBlock):
    """The GL-symmetric block: every read and write of the stream is a 1x1 conv.

    p = P1(u) * P2(u) (P1, P2: n -> k n / 2, stacked in ``coef``), a 3x3 depthwise conv with
    multiplier 2, BN, A: k n -> m, BN. u -> T u with P -> P T^-1 and A -> T A leaves it
    unchanged for any invertible T (orthogonal T with a radial activation).
    """

    form = "glb"

    def __init__(self, n, m, stride, k, shared, act, radius, drop_path=0.0, coef_bn=False):
        super().__init__(n, m, stride, k, shared, act, radius, drop_path, coef_bn)
        half = k * n // 2
        self.coef = conv1x1(n, 2 * half)
        self.bn_coef = self._bn_coef(2 * half)
        self.dw = DepthwiseConv3x3(half, 2, shared, stride)
        self.bn_dw = nn.BatchNorm2d(k * n)
        self.proj = conv1x1(k * n, m)
        self.bn_out = nn.BatchNorm2d(m)

    def residual(self, u):
        p1, p2 = self.coefficients(u).chunk(2, dim=1)
        return self.bn_out(self.proj(self.bn_dw(self.dw(p1 * p2))))


BLOCKS: dict[str, type[QLBlock]] = {
    cls.form: cls for cls in (Eq3Block, Eq4Block, Eq5Block, Eq6Block, Eq7Block, GLBlock)
}
