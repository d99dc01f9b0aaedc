"""CUDA check of the training path (no FFCV needed): nccl DDP, bf16 autocast, channels_last.

Runs qlnas's own `train_one_epoch` and `evaluate` on a synthetic, learnable batch stream for
two Table 1 variants and prints the loss going down; exits non-zero on any failure.
    python3 bench/gpu_smoke.py     (from the repo root, PYTHONPATH=.)
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> int:
    from qlnas.train.config import TrainConfig
    from qlnas.train.distributed import setup_distributed, teardown_distributed
    from qlnas.train.engine import Progress, evaluate, train_one_epoch
    from qlnas.train.fit import build_model, make_parts

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    info = setup_distributed()
    if not dist.is_initialized():  # world size 1: make the nccl group ourselves for DDP
        dist.init_process_group("nccl", rank=0, world_size=1)
        info = setup_distributed()
    print(f"device {torch.cuda.get_device_name(0)}, backend {dist.get_backend()}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    protos = torch.randn(10, 3, 64, 64, device="cuda", generator=gen)
    ok = True
    for name in ("qlnet50_eq3_softball_ds", "qlnet50_glb_softball_ds"):
        config = TrainConfig(model=name, epochs=2, batch_size=64, lr=0.1, warmup_epochs=0.0,
                             resolution=64)
        torch.manual_seed(0)
        model = build_model(config, 10)
        parts = make_parts(config, model, info, 10, steps_per_epoch=20)
        assert parts.autocast_dtype is torch.bfloat16
        # One GPU: a world of one, but the same DDP wrapper (nccl) as a multi-GPU run.
        parts.train_model = torch.nn.parallel.DistributedDataParallel(parts.model,
                                                                      device_ids=[0])
        flag = torch.ones(1, device="cuda")
        dist.all_reduce(flag)

        def batches(n=20):
            for _ in range(n):
                y = torch.randint(0, 10, (64,), device="cuda", generator=gen)
                x = protos[y] + 0.5 * torch.randn(64, 3, 64, 64, device="cuda", generator=gen)
                yield x.contiguous(memory_format=torch.channels_last), y

        class Loader:
            def __iter__(self):
                return batches()

            def __len__(self):
                return 20

        progress = Progress()
        t0 = time.perf_counter()
        first = train_one_epoch(parts, Loader(), progress)
        second = train_one_epoch(parts, Loader(), Progress(epoch=1, step=progress.step))
        val = evaluate(parts.model, Loader(), parts)
        torch.cuda.synchronize()
        print(f"{name}: loss {first['train_loss']:.3f} -> {second['train_loss']:.3f}, "
              f"val top1 {val['val_top1']:.3f}, {time.perf_counter() - t0:.1f} s, "
              f"peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
        ok &= second["train_loss"] < first["train_loss"] and not first["nonfinite"]
    teardown_distributed(info)
    if dist.is_initialized():
        dist.destroy_process_group()
    print("gpu smoke:", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
