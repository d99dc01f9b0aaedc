"""Loader memory per process, cached vs streamed (qlnas.data.order), under DDP: two gloo
ranks read one epoch of a file several times the streamed window, side by side in one run.

Per process it reports the pages of the file it has mapped (shared through the node's page
cache: a cached node needs the whole file there to read from RAM) and the private memory an
epoch allocates (the streamed window of pages, sampled every 20 ms from /proc/self/status),
plus img/s; then what the measured ratio means for ImageNet at 512 px (8 MiB pages, batch
128 per process).

    python bench/loader_memory.py --out bench/results     # about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import threading
import time
from pathlib import Path

WORLD = 2
IMAGENET_BYTES = 140 * 2**30  # ImageNet-1k train at --max-res 512
IMAGENET_BATCH = 128
IMAGENET_PAGE = 8 << 20


def _mapped(path: str) -> int:
    """Bytes of `path` resident in this process's mappings (its pages in the page cache that
    this process has touched)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = line.rstrip().endswith(" " + path)
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) << 10
    return total


def _anon() -> int:
    """This process's private resident memory (RssAnon), in bytes."""
    return int(re.search(r"RssAnon:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) << 10


class Sampler(threading.Thread):
    """The largest RssAnon of this process while it runs."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = _anon()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, _anon())


def _rank(rank: int, port: int, path: str, mode: str, batch: int, queue) -> None:
    import torch.distributed as dist

    from qlnas.data import build_train_loader

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        loader = build_train_loader(path, batch_size=batch, resolution=64, distributed=True,
                                    num_workers=1, mode=mode)
        for _ in loader:  # epoch 0: numba compiles the pipeline
            pass
        start = _anon()
        sampler = Sampler()
        sampler.start()
        t0, seen = time.perf_counter(), 0
        for _, labels in loader:
            seen += len(labels)
        elapsed = time.perf_counter() - t0
        mapped = _mapped(os.path.realpath(path))
        sampler.stop.set()
        sampler.join()
        queue.put((rank, {"mode": loader.mode, "file_mib": mapped / 2**20,
                          "private_mib": (sampler.peak - start) / 2**20,
                          "img_per_s": seen / elapsed}))
    finally:
        dist.destroy_process_group()


def measure(path: Path, mode: str, batch: int, port: int) -> dict:
    """Per-rank numbers of one epoch read by WORLD processes in `mode`."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, str(path), mode, batch, queue))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise RuntimeError(f"a {mode} rank exited with {p.exitcode}")
    return {k: max(r[k] for r in results.values()) if k != "mode" else results[0][k]
            for k in results[0]}


def main(argv: list[str] | None = None) -> int:
    from qlnas.bench.photos import make_jpegs
    from qlnas.data.integrity import open_beton
    from qlnas.data.order import stream_window
    from qlnas.data.writer import write_beton

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=4000, help="500x375 images (default 4000)")
    p.add_argument("--batch", type=int, default=8, help="images per process and batch")
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/qlnas/bench-memory"))
    p.add_argument("--out", default=None, help="folder for loader_memory.json")
    args = p.parse_args(argv)
    cache = Path(args.cache)
    src = make_jpegs(cache / "jpegs", count=args.count)
    beton = cache / f"train-{args.count}.beton"
    if not beton.exists():
        write_beton(src, beton, max_res=512, page_size=2 << 20)
    size, page = beton.stat().st_size, open_beton(beton).page_size
    window = stream_window(args.batch, page)
    port = 29400 + os.getpid() % 500
    rows = {mode: measure(beton, mode, args.batch, port + k)
            for k, mode in enumerate(("cached", "streamed"))}
    cached, streamed = rows["cached"], rows["streamed"]
    print(f"loader memory per process, {WORLD} DDP processes (gloo), batch {args.batch} each, "
          f"{size / 2**20:.0f} MiB file of {page >> 20} MiB pages, streamed window {window} "
          f"pages ({window * page / 2**20:.0f} MiB); {platform.processor() or platform.machine()}, "
          f"{len(os.sched_getaffinity(0))} cores")
    print(f"{'mode':>9} | {'file pages mapped':>17} | {'private per epoch':>17} | "
          f"{'img/s per process':>17}")
    for mode, r in rows.items():
        print(f"{mode:>9} | {r['file_mib']:>13.0f} MiB | {r['private_mib']:>13.0f} MiB | "
              f"{r['img_per_s']:>17.0f}")
    per_window = streamed["private_mib"] * 2**20 / (window * page)
    imagenet_window = stream_window(IMAGENET_BATCH, IMAGENET_PAGE)
    projected = per_window * imagenet_window * IMAGENET_PAGE / 2**30
    print(f"streamed private memory = {per_window:.2f}x its window; its mapped file pages = "
          f"{streamed['file_mib'] * 2**20 / size:.2f}x the file (cached: "
          f"{cached['file_mib'] * 2**20 / size:.2f}x); streamed img/s = "
          f"{streamed['img_per_s'] / cached['img_per_s']:.2f}x cached")
    print(f"ImageNet-1k at 512 px ({IMAGENET_BYTES / 2**30:.0f} GiB): cached needs the whole "
          f"file in each node's page cache; streamed holds about {projected:.1f} GiB per "
          f"process (window {imagenet_window} pages of {IMAGENET_PAGE >> 20} MiB at batch "
          f"{IMAGENET_BATCH}), {8 * projected:.0f} GiB for 8 processes")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "loader_memory.json").write_text(json.dumps(
            {"world": WORLD, "batch": args.batch, "file_mib": size / 2**20,
             "page_mib": page / 2**20, "window_pages": window, "per_process": rows,
             "streamed_private_over_window": per_window,
             "imagenet_streamed_gib_per_process": projected}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
