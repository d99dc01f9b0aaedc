"""Triton kernels (CUDA) for the QL blocks' 3x3 depthwise conv with a channel multiplier k,
with the folded BN's bias and the block's element-wise product fused into its forward.

On an H200 the eager Eq.(3) model moves its bytes at about a sixth of the card's bandwidth:
cuDNN writes the depthwise output, then the product reads it back. Here one pass reads the
(k times smaller) input and the other factor and writes the product; the backward computes
both gradients without materialising the repeated shared kernel's activations.

Off by default until timed on a GPU (``bash bench/gpu.sh`` compares both paths):
``QLNAS_TRITON=1`` selects it for CUDA tensors. Channels-last (NHWC) layout, any float dtype,
float32 accumulation. The tests run the kernels in Triton's CPU interpreter
(``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from qlnas.models.native import nhwc, taps

BLOCK_P, BLOCK_C = 32, 64


def runs_on(x: torch.Tensor) -> bool:
    """Can the kernels take this tensor? (CUDA, or any device in Triton's interpreter.)
    Whether they are used at all is ``QLNAS_TRITON=1``, read by `qlnas.models.layers`."""
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _fwd(x_ptr, w_ptr, bias_ptr, other_ptr, y_ptr, P, H, W, Ho, Wo, n, C,
         K: tl.constexpr, S: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_OTHER: tl.constexpr,
         BP: tl.constexpr, BC: tl.constexpr):
    p = tl.program_id(0).to(tl.int64) * BP + tl.arange(0, BP)
    o = tl.program_id(1) * BC + tl.arange(0, BC)
    pm, om = p < P, o < C
    wo = p % Wo
    ho = (p // Wo) % Ho
    b = p // (Wo * Ho)
    j = o // K
    acc = tl.zeros((BP, BC), dtype=tl.float32)
    for dy in tl.static_range(3):
        hi = ho * S - 1 + dy
        for dx in tl.static_range(3):
            wi = wo * S - 1 + dx
            ok = pm & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            xv = tl.load(x_ptr + ((b * H + hi) * W + wi)[:, None] * n + j[None, :],
                         mask=ok[:, None] & om[None, :], other=0.0)
            wv = tl.load(w_ptr + (dy * 3 + dx) * C + o, mask=om, other=0.0)
            acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o, mask=om, other=0.0).to(tl.float32)[None, :]
    offs = p[:, None] * C + o[None, :]
    mask = pm[:, None] & om[None, :]
    if HAS_OTHER:
        acc *= tl.load(other_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_x(gy_ptr, w_ptr, gx_ptr, P, H, W, Ho, Wo, n, C,
            K: tl.constexpr, S: tl.constexpr, BP: tl.constexpr, BJ: tl.constexpr):
    p = tl.program_id(0).to(tl.int64) * BP + tl.arange(0, BP)  # input pixels
    j = tl.program_id(1) * BJ + tl.arange(0, BJ)
    pm, jm = p < P, j < n
    wi = p % W
    hi = (p // W) % H
    b = p // (W * H)
    acc = tl.zeros((BP, BJ), dtype=tl.float32)
    for dy in tl.static_range(3):
        t = hi + 1 - dy
        ho = t // S
        oky = (t >= 0) & (t % S == 0) & (ho < Ho)
        for dx in tl.static_range(3):
            u = wi + 1 - dx
            wo = u // S
            ok = pm & oky & (u >= 0) & (u % S == 0) & (wo < Wo)
            row = ((b * Ho + ho) * Wo + wo) * C
            for c in tl.static_range(K):
                o = j * K + c
                gv = tl.load(gy_ptr + row[:, None] + o[None, :], mask=ok[:, None] & jm[None, :],
                             other=0.0)
                wv = tl.load(w_ptr + (dy * 3 + dx) * C + o, mask=jm, other=0.0)
                acc += gv.to(tl.float32) * wv.to(tl.float32)[None, :]
    tl.store(gx_ptr + p[:, None] * n + j[None, :], acc.to(gx_ptr.dtype.element_ty),
             mask=pm[:, None] & jm[None, :])


@triton.jit
def _grad_w(gy_ptr, x_ptr, part_ptr, P, H, W, Ho, Wo, n, C,
            K: tl.constexpr, S: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr):
    pid = tl.program_id(0)
    p = pid.to(tl.int64) * BP + tl.arange(0, BP)  # output pixels
    o = tl.program_id(1) * BC + tl.arange(0, BC)
    pm, om = p < P, o < C
    wo = p % Wo
    ho = (p // Wo) % Ho
    b = p // (Wo * Ho)
    gv = tl.load(gy_ptr + p[:, None] * C + o[None, :], mask=pm[:, None] & om[None, :],
                 other=0.0).to(tl.float32)
    for dy in tl.static_range(3):
        hi = ho * S - 1 + dy
        for dx in tl.static_range(3):
            wi = wo * S - 1 + dx
            ok = pm & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            xv = tl.load(x_ptr + ((b * H + hi) * W + wi)[:, None] * n + (o // K)[None, :],
                         mask=ok[:, None] & om[None, :], other=0.0)
            tl.store(part_ptr + (pid * 9 + dy * 3 + dx) * C + o,
                     tl.sum(xv.to(tl.float32) * gv, axis=0), mask=om)


def _out_size(size: int, stride: int) -> int:
    return (size - 1) // stride + 1


def depthwise3x3_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            other: torch.Tensor | None, stride: int) -> torch.Tensor:
    """(conv2d(x, weight, bias, stride, padding=1, groups=n) * other), channels_last out."""
    b, n, h, w = x.shape
    c = weight.shape[0]
    ho, wo = _out_size(h, stride), _out_size(w, stride)
    xh = nhwc(x)
    y = torch.empty(b, ho, wo, c, device=x.device, dtype=x.dtype)
    oh = nhwc(other) if other is not None else y
    grid = (triton.cdiv(b * ho * wo, BLOCK_P), triton.cdiv(c, BLOCK_C))
    _fwd[grid](xh, taps(weight), bias if bias is not None else y, oh, y, b * ho * wo, h, w,
               ho, wo, n, c, K=c // n, S=stride, HAS_BIAS=bias is not None,
               HAS_OTHER=other is not None, BP=BLOCK_P, BC=BLOCK_C)
    return y.permute(0, 3, 1, 2)


class _DepthwiseFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, stride):
        ctx.stride = stride
        ctx.save_for_backward(x, weight)
        return depthwise3x3_mul(x, weight, None, None, stride)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        b, n, h, w = x.shape
        c, s = weight.shape[0], ctx.stride
        ho, wo = gy.shape[-2:]
        gyh, xh, wt = nhwc(gy), nhwc(x), taps(weight)
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gxh = torch.empty(b, h, w, n, device=x.device, dtype=x.dtype)
            grid = (triton.cdiv(b * h * w, BLOCK_P), triton.cdiv(n, BLOCK_C))
            _grad_x[grid](gyh, wt, gxh, b * h * w, h, w, ho, wo, n, c, K=c // n, S=s,
                          BP=BLOCK_P, BJ=BLOCK_C)
            gx = gxh.permute(0, 3, 1, 2)
        if ctx.needs_input_grad[1]:
            blocks = triton.cdiv(b * ho * wo, BLOCK_P)
            part = torch.empty(blocks, 9, c, device=x.device, dtype=torch.float32)
            _grad_w[(blocks, triton.cdiv(c, BLOCK_C))](gyh, xh, part, b * ho * wo, h, w, ho,
                                                       wo, n, c, K=c // n, S=s, BP=BLOCK_P,
                                                       BC=BLOCK_C)
            gw = part.sum(0).t().reshape(weight.shape).to(weight.dtype)
        return gx, gw, None


def depthwise3x3(x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    """Differentiable conv2d(x, weight, stride=stride, padding=1, groups=x.shape[1])."""
    return _DepthwiseFn.apply(x, weight, stride)
