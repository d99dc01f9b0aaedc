"""Distributed set-up shared by torchrun, `qlnas train --nproc` and Ray Train workers."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    owns_group: bool
    """True when this process created the process group (and must destroy it)."""

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def setup_distributed() -> DistInfo:
    """Join the job this process belongs to.

    A process group made by the caller (Ray Train makes one) is used as it is; otherwise
    torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) start one: nccl on
    CUDA, gloo on CPU. A lone process runs without one.
    """
    cuda = torch.cuda.is_available()
    owns = False
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
        if world > 1:
            if cuda:
                torch.cuda.set_device(_env_int("LOCAL_RANK", 0) % torch.cuda.device_count())
            dist.init_process_group(backend="nccl" if cuda else "gloo")
            owns = True
    local_rank = _env_int("LOCAL_RANK", rank)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # Share the cores of this node between its processes.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    return DistInfo(rank, world, local_rank, local_world, device, owns)


def teardown_distributed(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_max(value: float, info: DistInfo) -> float:
    """The largest value over all processes (one small all-reduce)."""
    if not info.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        values = values.to(info.device)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_object(obj: object, info: DistInfo) -> object:
    """Rank 0's object on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: object, info: DistInfo) -> list | None:
    """Every rank's `obj` as a list indexed by rank on the primary; None elsewhere."""
    if not info.distributed:
        return [obj]
    box = [None] * info.world_size if info.is_primary else None
    dist.gather_object(obj, box, dst=0)
    return box


def broadcast_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Rank 0's buffers (BN running statistics) on every rank: DDP leaves each rank with the
    statistics of its own last batches, so ranks would evaluate different models."""
    if not info.distributed:
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src=0)
