"""The native CPU kernel of the 3x3 depthwise conv with a channel multiplier (csrc/dw3x3.cpp).

oneDNN runs a depthwise conv whose multiplier is above 1 (every QL block but Eq.(7)'s) through
its generic grouped-conv code; the kernel here runs it at memory speed, in training (forward
and both gradients) and in inference, where it also applies the folded BN's bias and the
block's element-wise product before writing. It is compiled on first use (about a minute, once
per machine; cached under ~/.cache/qlnas/ext) and used on CPU for float32; everywhere else,
and where it cannot be built, the blocks use PyTorch's conv. ``QLNAS_NATIVE=0`` turns it off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path
from types import ModuleType

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "dw3x3.cpp"
_FLAGS = ["-O3", "-march=native", "-fopenmp"]
_lock = threading.Lock()
_lib: ModuleType | None = None
_failed = False


def _cpu_signature() -> str:
    """What the build depends on: the CPU's instruction set, the source, torch, the flags."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    text = "|".join([flags, _SOURCE.read_text(), torch.__version__, " ".join(_FLAGS)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _build_dir() -> Path:
    root = Path(os.environ.get("QLNAS_EXT_DIR", Path.home() / ".cache" / "qlnas" / "ext"))
    path = root / f"dw3x3-{_cpu_signature()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def library() -> ModuleType | None:
    """The compiled kernel, built on first call; None where it is off or cannot be built."""
    global _lib, _failed
    if _lib is not None or _failed:
        return _lib
    with _lock:
        if _lib is not None or _failed:
            return _lib
        if os.environ.get("QLNAS_NATIVE", "1") == "0":
            _failed = True
            return None
        try:
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # CUDA_HOME
            from torch.utils.cpp_extension import load

            build = _build_dir()
            if not any(build.glob("qlnas_dw3x3*.so")):
                log.info("building the native depthwise kernel in %s (once, about a minute)",
                         build)
            _lib = load(name="qlnas_dw3x3", sources=[str(_SOURCE)], extra_cflags=_FLAGS,
                        extra_ldflags=["-fopenmp"], build_directory=str(build), verbose=False)
        except Exception as exc:  # no compiler, no ninja, ...: PyTorch's conv still works
            log.warning("native depthwise kernel unavailable (%s); using PyTorch's conv",
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            _failed = True
    return _lib


def eligible(*tensors: torch.Tensor) -> bool:
    """Can the native kernel run on these tensors (CPU float32, eager, no dispatch mode)?"""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None
            and not torch.is_autocast_enabled("cpu")
            and library() is not None)


def nhwc(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> contiguous (B, H, W, C); no copy for a channels_last tensor."""
    return x.permute(0, 2, 3, 1).contiguous()


def taps(weight: torch.Tensor) -> torch.Tensor:
    """(C, 1, 3, 3) -> (9, C): each tap's weights over the channels, contiguous."""
    return weight.reshape(weight.shape[0], 9).t().contiguous()


class _DepthwiseFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, k, stride):
        ctx.k, ctx.stride = k, stride
        ctx.save_for_backward(x, weight)
        empty = x.new_empty(0)
        y = library().forward(nhwc(x), taps(weight), empty, empty, k, stride)
        return y.permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx, gw = library().backward(nhwc(gy), nhwc(x), taps(weight), ctx.k, ctx.stride,
                                    need_x, need_w)
        gx = gx.permute(0, 3, 1, 2) if need_x else None
        gw = gw.t().reshape(weight.shape) if need_w else None
        return gx, gw, None, None


def depthwise3x3(x: torch.Tensor, weight: torch.Tensor, k: int, stride: int) -> torch.Tensor:
    """conv2d(x, weight, stride=stride, padding=1, groups=x.shape[1]) with weight (n k, 1, 3, 3),
    differentiable; the result is channels_last."""
    return _DepthwiseFn.apply(x, weight, k, stride)


def depthwise3x3_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     other: torch.Tensor | None, stride: int) -> torch.Tensor:
    """(conv2d(x, weight, bias, stride, padding=1, groups=n) * other) in one pass, no autograd."""
    k = weight.shape[0] // x.shape[1]
    empty = x.new_empty(0)
    y = library().forward(nhwc(x), taps(weight), empty if bias is None else bias.contiguous(),
                          empty if other is None else nhwc(other), k, stride)
    return y.permute(0, 3, 1, 2)




class _BnMulFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, c, gamma, beta, eps):
        p, mean, invstd, var = library().bn_mul_forward(nhwc(y), nhwc(c), gamma, beta, eps)
        ctx.save_for_backward(y, c, mean, invstd, gamma, beta)
        ctx.mark_non_differentiable(mean, var)
        return p.permute(0, 3, 1, 2), mean, var

    @staticmethod
    def backward(ctx, gp, _mean, _var):
        y, c, mean, invstd, gamma, beta = ctx.saved_tensors
        gy, gc, dgamma, dbeta = library().bn_mul_backward(nhwc(gp), nhwc(y), nhwc(c), mean,
                                                          invstd, gamma, beta)
        return gy.permute(0, 3, 1, 2), gc.permute(0, 3, 1, 2), dgamma, dbeta, None


class _DwBnMulFn(torch.autograd.Function):
    """bn(dw(x)) * c: the conv sums the BN's statistics as it writes y, and its backward
    computes the BN's gradient row by row as it reads it (stride 1), so y's gradient is never
    written out."""

    @staticmethod
    def forward(ctx, x, weight, c, gamma, beta, k, stride, eps):
        lib = library()
        y, mean, invstd, var = lib.forward_stats(nhwc(x), taps(weight), k, stride, eps)
        c = nhwc(c)
        p = lib.bn_mul_apply(y, c, mean, invstd, gamma, beta)
        ctx.k, ctx.stride = k, stride
        ctx.save_for_backward(x, weight, y, c, mean, invstd, gamma, beta)
        ctx.mark_non_differentiable(mean, var)
        return p.permute(0, 3, 1, 2), mean, var

    @staticmethod
    def backward(ctx, gp, _mean, _var):
        x, weight, y, c, mean, invstd, gamma, beta = ctx.saved_tensors
        lib = library()
        gp = nhwc(gp)
        gc, dgamma, dbeta, a, b, d = lib.bn_mul_grad_sums(gp, y, c, mean, invstd, gamma, beta)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx, gw = lib.bn_backward(gp, y, c, a, b, d, nhwc(x), taps(weight), ctx.k, ctx.stride,
                                 need_x, need_w)
        gx = gx.permute(0, 3, 1, 2) if need_x else None
        gw = gw.t().reshape(weight.shape) if need_w else None
        return gx, gw, gc.permute(0, 3, 1, 2), dgamma, dbeta, None, None, None


def bn_mul_fusable(bn: torch.nn.Module, y: torch.Tensor, c: torch.Tensor) -> bool:
    """Can bn(y) * c run as one native op? (A plain train-mode BN with running statistics.)"""
    return (type(bn) is torch.nn.BatchNorm2d and bn.training and bn.affine
            and bn.track_running_stats and bn.momentum is not None
            and eligible(y, c, bn.weight))


def _track(bn: torch.nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor) -> None:
    """Update the BN's running statistics as a train-mode BN does."""
    with torch.no_grad():
        bn.running_mean.lerp_(mean, bn.momentum)
        bn.running_var.lerp_(var, bn.momentum)
        bn.num_batches_tracked.add_(1)


def bn_mul(bn: torch.nn.BatchNorm2d, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """bn(y) * c for a train-mode BN, in two passes over the data each way instead of five
    (and four instead of six backward); updates the BN's running statistics like BN does."""
    out, mean, var = _BnMulFn.apply(y, c, bn.weight, bn.bias, bn.eps)
    _track(bn, mean, var)
    return out


def dw_bn_mul(x: torch.Tensor, weight: torch.Tensor, k: int, stride: int,
              bn: torch.nn.BatchNorm2d, c: torch.Tensor) -> torch.Tensor:
    """bn(conv2d(x, weight, stride=stride, padding=1, groups=n)) * c for a train-mode BN
    (`bn_mul_fusable`), weight (n k, 1, 3, 3): one pass over the conv's output fewer forward and
    three fewer backward than the conv followed by `bn_mul`."""
    out, mean, var = _DwBnMulFn.apply(x, weight, c, bn.weight, bn.bias, k, stride, bn.eps)
    _track(bn, mean, var)
    return out


def main() -> int:
    """Build the kernel now (``make setup`` does), so a first training step does not wait."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    lib = library()
    where = f" ({Path(lib.__file__).parent})" if lib else ""
    print(f"native depthwise kernel: {'ready' if lib else 'unavailable'}{where}")
    return 0 if lib or os.environ.get("QLNAS_NATIVE") == "0" else 1
