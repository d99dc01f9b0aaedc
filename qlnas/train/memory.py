"""How much memory a training step takes, and how much this process may still use: what
`qlnas train --dry-run` checks before it times a batch that could get the process killed."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from qlnas.train.engine import Parts


def peak_memory(device: torch.device) -> dict[str, int]:
    """Bytes at the high-water mark so far: "rss" (resident, the whole process) and on CUDA
    "cuda" (allocated on `device` since the last reset of its peak statistics)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = {"rss": rss if sys.platform == "darwin" else rss * 1024}  # Linux: KiB
    if device.type == "cuda":
        peak["cuda"] = torch.cuda.max_memory_allocated(device)
    return peak


def probe_step(parts: Parts, batch: int, resolution: int, num_classes: int) -> int:
    """Peak bytes (CUDA: allocated; CPU: resident) after one step of `batch` noise images.
    The eager model (no compile for a shape used once), gradients zeroed before the update:
    the optimizer state is allocated, the weights do not learn noise."""
    device, dtype = parts.dist.device, parts.autocast_dtype
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    parts.model.train()
    images = torch.randn(batch, 3, resolution, resolution, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, num_classes, (batch,), device=device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        loss = torch.nn.functional.cross_entropy(parts.model(images).float(), target)
    loss.backward()
    for p in parts.model.parameters():
        if p.grad is not None:
            p.grad.zero_()
    parts.optimizer.step()
    parts.optimizer.zero_grad(set_to_none=True)
    del images, target, loss
    return peak_memory(device)["cuda" if device.type == "cuda" else "rss"]


def free_memory(device: torch.device) -> int | None:
    """Bytes this process can grow to: its own and what is free (on CPU the smaller of the
    machine's available memory and its cgroup's limit); None where unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device)
    try:
        with open("/proc/self/statm") as f:
            own = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        free = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    try:  # cgroup v2: the limit of this process's group (none, or unreadable: no limit)
        with open("/proc/self/cgroup") as f:
            group = Path("/sys/fs/cgroup") / f.read().strip().split("::", 1)[1].lstrip("/")
        limit = (group / "memory.max").read_text().strip()
        if limit != "max":
            free = min(free, int(limit) - int((group / "memory.current").read_text()))
    except (OSError, IndexError, ValueError):
        pass
    return own + free
