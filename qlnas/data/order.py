"""The order in which a process reads a `.beton` file, and which of the two ways of reading it
fits the node: `cached` or `streamed`.

- `cached`: the file is memory-mapped and read through the OS page cache, which every process
  of the node shares; each epoch is a full random permutation. After the first epoch a file
  that fits in memory is read from RAM; one that does not is read from disk at random, over and
  over (thrashing the page cache: every process waits on the disk).
- `streamed`: each process reads only its share's pages (FFCV's allocation unit, 8 MiB by
  default) into its own memory, a window of pages at a time, and frees them when done. The
  epoch shuffles the pages, gives each rank a contiguous run of them, and draws every sample
  at random from a window of `window` live pages, so a process holds about `window` pages
  (plus the few it prefetches) whatever the file's size. FFCV's own `QUASI_RANDOM` order does
  the same for one process but refuses `distributed=True`.

`auto` takes `cached` when the file is at most half the node's memory (the smallest over the
job's nodes), `streamed` otherwise.

Both orders are functions of (seed, epoch, world size, rank) alone, so a resumed run sees the
batches of an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from qlnas.errors import UserError

log = logging.getLogger(__name__)

MODES = ("auto", "cached", "streamed")
CACHE_FRACTION = 0.5
"""`auto`: files up to this fraction of the node's memory are read `cached`."""
STREAM_BUFFER_BYTES = 1 << 30
"""`streamed`: the window's pages per process take at most this much memory (at least
MIN_WINDOW pages)."""
MIN_WINDOW = 8

_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def node_memory() -> int:
    """Bytes of memory this process's node offers: the machine's RAM, or its cgroup's limit
    when smaller (a container's page cache counts against its limit)."""
    total = None
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
                break
    if total is None:
        raise RuntimeError("/proc/meminfo has no MemTotal line")
    for path in _CGROUP_LIMITS:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def choose_mode(file_bytes: int, memory_bytes: int) -> str:
    """`cached` when the file fits in CACHE_FRACTION of the memory, `streamed` otherwise."""
    return "cached" if file_bytes <= CACHE_FRACTION * memory_bytes else "streamed"


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UserError(f"data_mode={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def stream_window(batch_size: int, page_size: int) -> int:
    """Pages each process keeps live in `streamed` mode: two per sample of a batch (FFCV's
    QUASI_RANDOM buffer, so a batch's samples come from different pages, and so from
    different classes of a class-sorted file), capped by STREAM_BUFFER_BYTES."""
    return max(MIN_WINDOW, min(2 * batch_size, STREAM_BUFFER_BYTES // page_size))


class SeededOrder:
    """`cached` order: a permutation seeded by (seed, epoch), then this rank's share.

    Ranks take every world-size-th sample; with `equal_shares` the < world-size samples left
    over are dropped so every rank runs the same number of steps (training), otherwise each
    sample is read exactly once over all ranks (evaluation).
    """

    def __init__(self, num_samples: int, *, shuffle: bool, seed: int, rank: int, world: int,
                 equal_shares: bool) -> None:
        self.indices = np.arange(num_samples, dtype=np.uint64)
        self.shuffle, self.seed = shuffle, seed
        self.rank, self.world, self.equal_shares = rank, world, equal_shares

    def sample_order(self, epoch: int) -> np.ndarray:
        order = self.indices
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(order)
        if self.equal_shares:
            order = order[:len(order) - len(order) % self.world]
        return order[self.rank::self.world]


class PagedOrder:
    """`streamed` order: whole pages to each rank, samples drawn at random from a window of
    `window` pages.

    `pages[i]` is the page sample i is stored in. With `shuffle`, an epoch permutes the pages
    (and the samples within each), cuts the sequence into one contiguous share per rank, and
    emits the share's samples by drawing each from a random one of the `window` pages open at
    the time (a page closes when its samples are spent and the next one opens). Without it
    (evaluation) each rank reads a contiguous share in file order. `equal_shares` as in
    SeededOrder.
    """

    def __init__(self, pages: np.ndarray, *, shuffle: bool, seed: int, rank: int, world: int,
                 equal_shares: bool, window: int) -> None:
        if window < 1:
            raise ValueError(f"window={window}: expected at least 1 page")
        self.pages = np.asarray(pages, dtype=np.int64)
        self.shuffle, self.seed, self.window = shuffle, seed, int(window)
        self.rank, self.world, self.equal_shares = rank, world, equal_shares
        self._last: tuple[int, np.ndarray] | None = None

    def sample_order(self, epoch: int) -> np.ndarray:
        if self._last is not None and self._last[0] == epoch:  # asked twice per epoch
            return self._last[1]
        n = len(self.pages)
        rng = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
        if rng is None:
            sequence = np.arange(n, dtype=np.int64)
        else:
            # The samples grouped by page, pages in a random order, samples within one too.
            _, group = np.unique(self.pages, return_inverse=True)
            place = rng.permutation(group.max() + 1 if n else 0)
            sequence = np.lexsort((rng.random(n), place[group])).astype(np.int64)
        if self.equal_shares:
            share = n // self.world
            mine = sequence[self.rank * share:(self.rank + 1) * share]
        else:
            mine = np.array_split(sequence, self.world)[self.rank]
        if rng is not None:
            mine = self._mix(mine, rng)
        order = mine.astype(np.uint64)
        self._last = (epoch, order)
        return order

    def _mix(self, samples: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """`samples` (runs of one page each) drawn from a window of open pages: each draw
        from a random open page, the next page opening when one is spent; once the last page
        is open, what is left comes in a random order (so the last batches mix as many
        pages as the others, rather than draining the last few pages one by one)."""
        if len(samples) == 0:
            return samples
        pages = self.pages[samples]
        starts = np.flatnonzero(np.r_[True, pages[1:] != pages[:-1]]).tolist()
        ends = starts[1:] + [len(samples)]
        draws = rng.integers(0, 1 << 62, size=len(samples)).tolist()
        source = samples.tolist()
        out: list[int] = []
        open_runs: list[list[int]] = []  # [next unread position, end] of each open page
        next_run = 0
        for draw in draws:
            while next_run < len(starts) and len(open_runs) < self.window:
                open_runs.append([starts[next_run], ends[next_run]])
                next_run += 1
            if next_run == len(starts):
                break
            k = draw % len(open_runs)
            run = open_runs[k]
            out.append(source[run[0]])
            run[0] += 1
            if run[0] == run[1]:  # spent: the last open page takes its place
                open_runs[k] = open_runs[-1]
                open_runs.pop()
        rest = [source[p] for start, end in open_runs for p in range(start, end)]
        out.extend(rng.permutation(np.array(rest, dtype=samples.dtype)).tolist())
        return np.array(out, dtype=samples.dtype)


def sample_pages(reader) -> np.ndarray:
    """The page each sample of an FFCV reader's file is stored in (its first allocation's;
    page 0 for a sample without one)."""
    table = reader.alloc_table
    pages = np.full(reader.num_samples, np.iinfo(np.int64).max, dtype=np.int64)
    shift = int(np.log2(reader.page_size))
    np.minimum.at(pages, table["sample_id"].astype(np.int64),
                  (table["ptr"] >> np.uint64(shift)).astype(np.int64))
    pages[pages == np.iinfo(np.int64).max] = 0
    return pages


def resolve_mode(mode: str, path: str | os.PathLike, distributed: bool) -> str:
    """`cached` or `streamed` for reading `path`; `auto` decides from the file's size and the
    smallest node memory of the job (every rank must read in the same order)."""
    if check_mode(mode) != "auto":
        return mode
    memory = node_memory()
    if distributed:
        import torch.distributed as dist

        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, memory)
        memory = min(everyone)
    size = os.path.getsize(path)
    chosen = choose_mode(size, memory)
    log.info("%s: %.1f GiB on a node of %.1f GiB: reading it %s", path, size / 2**30,
             memory / 2**30, chosen)
    return chosen
