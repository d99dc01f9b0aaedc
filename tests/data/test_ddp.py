"""Two gloo ranks on CPU read disjoint shares that together cover the epoch, cached or
streamed."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qlnas.data import build_train_loader, build_val_loader
from tests.data.conftest import make_tree


def _rank(rank, world, port, beton, mode, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        train = build_train_loader(beton, batch_size=4, resolution=16, distributed=True,
                                   drop_last=False, num_workers=1, mode=mode)
        val = build_val_loader(beton, batch_size=4, resolution=16, distributed=True,
                               num_workers=1, mode=mode)
        seen = {"modes": (train.mode, val.mode)}
        for epoch in (0, 1):
            train.set_epoch(epoch)
            seen[f"train{epoch}"] = torch.cat([y for _, y in train]).tolist()
        seen["val"] = torch.cat([y for _, y in val]).tolist()
        seen["len"] = len(train)
        queue.put((rank, seen))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["auto", "streamed"])
def test_two_ranks_get_disjoint_shares_covering_the_epoch(tmp_path, mode):
    from qlnas.data.writer import write_beton

    # one image per class: a label names its sample
    src = make_tree(tmp_path / "src", {f"c{n:02d}": 1 for n in range(30)}, size=(32, 32))
    beton = tmp_path / "unique.beton"
    write_beton(src, beton, workers=1)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_rank, args=(r, 2, port, str(beton), mode, queue))
             for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    a, b = results[0], results[1]
    expected = ("cached", "cached") if mode == "auto" else ("streamed", "streamed")
    assert a["modes"] == b["modes"] == expected
    assert a["len"] == b["len"] == 4  # 15 samples each, batches of 4, last one kept
    for key in ("train0", "train1", "val"):
        assert not set(a[key]) & set(b[key])
        assert sorted(a[key] + b[key]) == list(range(30))
    assert a["train0"] != a["train1"]
