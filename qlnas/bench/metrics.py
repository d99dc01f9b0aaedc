"""What the benchmarks measure besides time: peak memory, op traffic, bandwidth, the machine.

Peak memory: on CPU the rise of the process's resident set (Linux VmHWM, reset before each
phase through /proc/self/clear_refs) above what it was before the phase, so it counts
activations, gradients, optimizer state and allocator slack, not the weights or the
interpreter; on CUDA ``torch.cuda.max_memory_allocated`` during the phase.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_and_peak() -> tuple[int, int]:
    """Current and peak resident set in bytes (Linux /proc; else psutil and ru_maxrss)."""
    try:
        fields = dict(line.split(":", 1) for line in
                      Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError):
        import resource

        import psutil
        return psutil.Process().memory_info().rss, \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory of one phase in bytes, `.peak` after the `with` block (see the module
    docstring for what is measured)."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __enter__(self) -> PeakMemory:
        import torch
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            _reset_peak_rss()
            self.start = _rss_and_peak()[0]
        return self

    def __exit__(self, *exc) -> None:
        import torch
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.peak = _rss_and_peak()[1] - self.start


def op_traffic_bytes(fn) -> int:
    """Bytes that the aten ops of `fn()` read and write, each operand counted once per op.

    An estimate of DRAM traffic when no intermediate stays in cache (true for the MB-sized
    activations here); the time it needs at the machine's bandwidth bounds memory-bound ops.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    views = _view_ops()

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func._overloadpacket not in views:
                flat = tree_flatten((args, kwargs, out))[0]
                Count.total += sum(t.numel() * t.element_size() for t in flat
                                   if isinstance(t, torch.Tensor))
            return out

    with Count():
        fn()
    return Count.total


def _view_ops() -> set:
    import torch
    a = torch.ops.aten
    return {a.view, a._unsafe_view, a.reshape, a.expand, a.t, a.transpose, a.permute,
            a.as_strided, a.detach, a.alias, a.unsqueeze, a.squeeze, a.slice, a.split,
            a.chunk, a.split_with_sizes, a.select, a.empty, a.empty_like, a.zeros_like,
            a.ones_like, a.empty_strided, a.lift_fresh, a.clone}


def bandwidth_gb_s(threads: int, mb: int = 256) -> float:
    """Copy bandwidth (read + write) of this process with `threads` threads, best of 5."""
    import torch
    torch.set_num_threads(threads)
    a = torch.ones(mb * 2**20 // 4)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * 4 / best / 1e9


def machine() -> dict:
    """Platform, Python, torch and timm versions, CPU name and count, GPU name if any."""
    import torch
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu": _cpu_name(), "cpus": os.cpu_count()}
    try:
        import timm
        info["timm"] = timm.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
