"""Writer benchmark: `qlnas data write` images/s per process on 500x375 and 2000x1500 JPEGs
(side by side, one run), the peak memory of one writer process by source size (a 4000x3000
source must cost about what a 500x375 one does: draft decoding), and the projected time to
write ImageNet-1k and ImageNet-100 on this machine and per 8 cores.

    python bench/writer.py --out bench/results      # about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMAGENET = {"ImageNet-1k": 1_281_167 + 50_000, "ImageNet-100": 126_689 + 5_000}
SIZES = {"500x375": ((500, 375), 0.0), "2000x1500": ((2000, 1500), 3.0)}
MEMORY_SIZES = ("500x375", "4000x3000")


def write_rate(src: Path, out: Path, workers: int, max_res: int) -> float:
    """Images/s of a whole `write_beton` (the check pass, decode, resize, encode, write)."""
    from qlnas.data.writer import write_beton

    start = time.perf_counter()
    result = write_beton(src, out, max_res=max_res, workers=workers, overwrite=True)
    return result.num_samples / (time.perf_counter() - start)


def peak_rss_mib(src: Path, max_res: int) -> float:
    """Peak RSS of a fresh one-process writer of `src`: its own high-water mark (VmHWM, which
    starts afresh at exec; getrusage's would keep this parent's from before the exec) or that
    of FFCV's worker processes when higher."""
    code = ("import re, resource, sys; from qlnas.data.writer import write_beton; "
            "write_beton(sys.argv[1], sys.argv[2], max_res=int(sys.argv[3]), workers=1, "
            "overwrite=True); hwm = int(re.search(r'VmHWM:\\s+(\\d+)', "
            "open('/proc/self/status').read()).group(1)); "
            "print(max(hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))")
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, "-c", code, str(src), f"{tmp}/m.beton",
                               str(max_res)], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1]) / 1024


def main(argv: list[str] | None = None) -> int:
    from qlnas.bench.photos import make_jpegs

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=240, help="images per size (default 240)")
    p.add_argument("--max-res", type=int, default=512, help="the writer's --max-res")
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/qlnas/bench-writer"))
    p.add_argument("--out", default=None, help="folder for writer.json")
    args = p.parse_args(argv)
    cache, cores = Path(args.cache), len(os.sched_getaffinity(0))
    rates: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (size, grain) in SIZES.items():
            src = make_jpegs(cache / name, count=args.count, size=size, grain=grain)
            rates[name] = {f"{w} process(es)": write_rate(src, Path(tmp) / f"{name}.beton", w,
                                                          args.max_res)
                           for w in sorted({1, cores})}
    memory = {}
    for name in MEMORY_SIZES:
        w, h = map(int, name.split("x"))
        memory[name] = peak_rss_mib(make_jpegs(cache / f"mem-{name}", count=12, size=(w, h),
                                               grain=3.0), args.max_res)
    print(f"writer, --max-res {args.max_res}, {args.count} images per size, {cores} cores "
          f"({platform.processor() or platform.machine()})")
    print(f"{'source':>10} | " + " | ".join(f"{k:>16}" for k in rates["500x375"]) + " | "
          "per process vs 500x375")
    for name, by in rates.items():
        per = by["1 process(es)"] / rates["500x375"]["1 process(es)"]
        print(f"{name:>10} | " + " | ".join(f"{v:>12.1f} img/s" for v in by.values())
              + f" | {per:.2f}x")
    print("peak RSS of one writer process: " + ", ".join(
        f"{k} sources {v:.0f} MiB" for k, v in memory.items())
        + f" (ratio {memory[MEMORY_SIZES[1]] / memory[MEMORY_SIZES[0]]:.2f}x)")
    per_process = rates["500x375"]["1 process(es)"]
    here = rates["500x375"][f"{cores} process(es)"]
    projected = {}
    for dataset, images in IMAGENET.items():
        local, eight = images / here / 3600, images / (8 * per_process) / 3600
        projected[dataset] = {"this machine (h)": local, "8 cores (h)": eight}
        print(f"{dataset} ({images:,} images of ~500x375): {60 * local:.0f} min on this "
              f"machine ({cores} processes), {60 * eight:.0f} min per 8 cores (8 processes at "
              "the one-process rate)")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "writer.json").write_text(json.dumps(
            {"cores": cores, "max_res": args.max_res, "count": args.count, "images_per_s": rates,
             "peak_rss_mib": memory, "projected_hours": projected,
             "max_rss_this_process_mib":
                 resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
