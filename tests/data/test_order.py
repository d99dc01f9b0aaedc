"""The two ways of reading a file: cached (a full shuffle through the shared page cache) and
streamed (whole pages per rank, a window of them open at a time), and the choice between them.

The memory a streamed process needs is what FFCV's own page scheduler allocates for the
order's batches (`compute_schedule(...).num_slots` pages), so that is what is asserted.
"""

import math
import re
from pathlib import Path

import numpy as np
import pytest
from ffcv.memory_managers.process_cache.schedule import compute_schedule
from ffcv.reader import Reader

from qlnas.data.order import (
    PagedOrder,
    SeededOrder,
    check_mode,
    choose_mode,
    node_memory,
    sample_pages,
    stream_window,
)
from qlnas.errors import UserError

PREFETCH = 3  # batches FFCV's page scheduler reads ahead (compute_schedule's default)


def class_sorted_pages(num_pages=300, seed=0):
    """A file as `qlnas data write` lays out an ImageFolder: runs of 20-60 samples per page,
    each page holding one class (page id = class id here)."""
    sizes = np.random.default_rng(seed).integers(20, 60, size=num_pages)
    return np.repeat(np.arange(num_pages), sizes), int(sizes.min())


def batches_of(order, batch):
    order = order.astype(np.int64)
    return [order[i:i + batch] for i in range(0, len(order) - len(order) % batch, batch)]


def slots(pages, order, batch):
    """Pages FFCV's process cache holds at once for this order: its memory, in pages."""
    return compute_schedule([set(pages[b].tolist()) for b in batches_of(order, batch)]).num_slots


@pytest.mark.parametrize("equal", [True, False])
def test_seeded_order_shares(equal):
    orders = [SeededOrder(103, shuffle=True, seed=1, rank=r, world=4, equal_shares=equal)
              for r in range(4)]
    shares = [o.sample_order(7) for o in orders]
    joined = np.concatenate(shares)
    assert len(set(joined.tolist())) == len(joined) == (100 if equal else 103)
    assert np.array_equal(shares[0], orders[0].sample_order(7))
    assert not np.array_equal(shares[0], orders[0].sample_order(8))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_streamed_shares_are_disjoint_equal_and_cover_the_epoch(world):
    pages, _ = class_sorted_pages()
    n = len(pages)
    for epoch in (0, 1):
        shares = [PagedOrder(pages, shuffle=True, seed=5, rank=r, world=world, equal_shares=True,
                             window=16).sample_order(epoch).astype(np.int64)
                  for r in range(world)]
        assert {len(s) for s in shares} == {n // world}
        union = np.concatenate(shares)
        assert len(np.unique(union)) == len(union) == n - n % world
    # evaluation: every sample once, in file order within each rank's contiguous share
    shares = [PagedOrder(pages, shuffle=False, seed=0, rank=r, world=world, equal_shares=False,
                         window=16).sample_order(0).astype(np.int64) for r in range(world)]
    assert np.array_equal(np.concatenate(shares), np.arange(n))


def test_streamed_order_is_a_function_of_seed_and_epoch():
    pages, _ = class_sorted_pages()

    def order(seed, epoch):
        return PagedOrder(pages, shuffle=True, seed=seed, rank=1, world=2, equal_shares=True,
                          window=16).sample_order(epoch)

    assert np.array_equal(order(1, 3), order(1, 3))
    assert not np.array_equal(order(1, 3), order(1, 4))
    assert not np.array_equal(order(1, 3), order(2, 3))
    # each rank's pages change from epoch to epoch: no rank is tied to a part of the file
    first = set(pages[order(1, 0).astype(np.int64)].tolist())
    second = set(pages[order(1, 1).astype(np.int64)].tolist())
    assert len(first & second) < 0.75 * len(first)


@pytest.mark.parametrize("batch,window", [(16, 8), (32, 64), (64, 16)])
def test_a_streamed_process_holds_a_window_of_pages_not_the_file(batch, window):
    pages, smallest = class_sorted_pages()
    num_pages = pages.max() + 1
    # Beyond the window: pages opened in the batches the scheduler reads ahead.
    bound = window + (PREFETCH + 1) * (math.ceil(batch / smallest) + 1)
    for world in (1, 2):
        for rank in range(world):
            order = PagedOrder(pages, shuffle=True, seed=0, rank=rank, world=world,
                               equal_shares=True, window=window).sample_order(0)
            assert slots(pages, order, batch) <= bound < num_pages / 2
    # what the cached order would need in a process cache: every page of the file
    shuffled = SeededOrder(len(pages), shuffle=True, seed=0, rank=0, world=1,
                           equal_shares=True).sample_order(0)
    assert slots(pages, shuffled, 32) > 0.95 * num_pages


def test_streamed_batches_mix_the_classes_of_a_class_sorted_file():
    pages, _ = class_sorted_pages()
    batch = 32
    order = PagedOrder(pages, shuffle=True, seed=0, rank=0, world=1, equal_shares=True,
                       window=stream_window(batch, 8 << 20)).sample_order(0)
    classes_per_batch = [len(set(pages[b].tolist())) for b in batches_of(order, batch)]
    assert np.mean(classes_per_batch) > 0.7 * batch
    assert min(classes_per_batch) > 0.5 * batch


def test_stream_window_is_two_pages_a_sample_within_the_memory_cap():
    assert stream_window(128, 8 << 20) == 128  # 1 GiB of 8 MiB pages: exactly the cap
    assert stream_window(256, 8 << 20) == 128
    assert stream_window(32, 8 << 20) == 64
    assert stream_window(1, 8 << 20) == 8  # never fewer than 8 pages


def test_auto_caches_a_file_up_to_half_the_memory():
    gib = 1 << 30
    assert choose_mode(140 * gib, 512 * gib) == "cached"  # ImageNet at 512 px, a big node
    assert choose_mode(140 * gib, 256 * gib) == "streamed"
    assert choose_mode(64 * gib, 128 * gib) == "cached"
    assert choose_mode(64 * gib + 1, 128 * gib) == "streamed"


def test_node_memory_is_the_machines_or_its_cgroups_limit():
    total = int(re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())[1]) * 1024
    limits = [int(t) for p in ("/sys/fs/cgroup/memory.max",
                               "/sys/fs/cgroup/memory/memory.limit_in_bytes")
              if Path(p).is_file() and (t := Path(p).read_text().strip()).isdigit()]
    assert node_memory() == min([total, *limits])


def test_an_unknown_mode_is_one_line():
    with pytest.raises(UserError, match="data_mode='ram': expected one of auto, cached, "
                                        "streamed"):
        check_mode("ram")


def test_sample_pages_match_ffcvs_own_page_table(demo_betons):
    """Against the table FFCV's memory managers read pages by."""
    from ffcv.memory_managers.os_cache import OSCacheManager

    reader = Reader(str(demo_betons[0]))
    ours = sample_pages(reader)
    theirs = OSCacheManager(reader).sample_to_pages
    assert len(ours) == reader.num_samples
    assert all(ours[s] == min(theirs[s]) for s in range(reader.num_samples))
    assert len(np.unique(ours)) > 1
