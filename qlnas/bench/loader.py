"""Loader benchmark: torchvision ImageFolder+DataLoader vs stock FFCV vs our scaled decoder.

All three read the same ImageNet-like JPEGs with the same workers and output size, after a
warm-up epoch each (numba compilation excluded), and stop at a uint8 image tensor. The decode
bound is the ratio of per-image decode+resize work (stock path / ours) on the same crops, one
thread, with no loader around it: the best speed-up our decoder alone could give.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import numpy as np

from qlnas.bench.photos import make_jpegs

log = logging.getLogger(__name__)

_KEEP = []  # loaders stay alive: freeing FFCV's compiled code makes numba print KeyErrors


def _images_per_s(loader, epochs: int) -> float:
    _KEEP.append(loader)
    for _ in loader:  # warm-up: compilation, page cache, worker start-up
        pass
    start = time.perf_counter()
    n = 0
    for _ in range(epochs):
        for images, _labels in loader:
            n += images.shape[0]
    return n / (time.perf_counter() - start)


def torchvision_rate(folder: Path, res: int, batch_size: int, workers: int,
                     epochs: int) -> float:
    import torch
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomResizedCrop(res), transforms.RandomHorizontalFlip(),
                             transforms.PILToTensor()])
    dataset = datasets.ImageFolder(str(folder), transform=tf)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         num_workers=workers, drop_last=True,
                                         persistent_workers=workers > 0)
    return _images_per_s(loader, epochs)


def torchvision_val_rate(folder: Path, res: int, batch_size: int, workers: int,
                         epochs: int) -> float:
    """timm's evaluation transform: shorter side to res / crop_pct, centre crop."""
    import torch
    from torchvision import datasets, transforms

    from qlnas.data.center_crop import DEFAULT_CROP_PCT

    tf = transforms.Compose([transforms.Resize(int(res / DEFAULT_CROP_PCT)),
                             transforms.CenterCrop(res), transforms.PILToTensor()])
    dataset = datasets.ImageFolder(str(folder), transform=tf)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=workers, persistent_workers=workers > 0)
    return _images_per_s(loader, epochs)


def ffcv_val_rate(beton: Path, res: int, batch_size: int, workers: int, epochs: int,
                  decoder: str) -> float:
    from qlnas.data.compare import uint8_loader

    return _images_per_s(uint8_loader(beton, "val", res, batch_size, workers, decoder), epochs)


def ffcv_rate(beton: Path, res: int, batch_size: int, workers: int, epochs: int,
              decoder: str) -> float:
    from qlnas.data.compare import uint8_loader

    return _images_per_s(uint8_loader(beton, "train", res, batch_size, workers, decoder), epochs)


def decode_bound(beton: Path, res: int, samples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Single-thread decode+resize cost of stock FFCV's path vs ours on the same random crops."""
    from qlnas.data.compare import random_crops
    from qlnas.data.decoders import decode_crop, decode_full

    jpegs, dims, crops = zip(*random_crops(beton, samples, seed), strict=True)
    max_h = max(h for h, _ in dims)
    max_w = max(w for _, w in dims)
    pixels = np.empty(3 * max_h * max_w, np.uint8)
    cut = np.empty(max(len(j) for j in jpegs) + 64, np.uint8)
    starts = np.empty((max_h // 16 + 2) * (max_w // 16 + 2), np.int64)
    out = np.empty((res, res, 3), np.uint8)

    def run(ours: bool) -> tuple[float, list[int]]:
        scales = []
        start = time.perf_counter()
        for data, (h, w), (i, j, ch, cw) in zip(jpegs, dims, crops, strict=True):
            if ours:
                scales.append(decode_crop(data, h, w, i, j, ch, cw, pixels, cut, starts, out,
                                          True))
            else:
                decode_full(data, h, w, i, j, ch, cw, pixels, out)
        return time.perf_counter() - start, scales

    run(True), run(False)  # compile
    t_ours, scales = run(True)
    t_stock, _ = run(False)
    counts = np.bincount(scales, minlength=9)
    return {"stock_us": 1e6 * t_stock / len(jpegs), "ours_us": 1e6 * t_ours / len(jpegs),
            "bound": t_stock / t_ours,
            **{f"scale_1/{d}": counts[d] / len(scales) for d in (1, 2, 4, 8)}}


def measure(folder: Path, beton: Path, split: str, res: int, args) -> dict:
    """images/s of torchvision, stock FFCV and ours on one split at one resolution, their
    ratios, and (train) the one-thread decode bound."""
    common = dict(res=res, batch_size=args.batch_size, workers=args.workers, epochs=args.epochs)
    tv, ffcv = (torchvision_rate, ffcv_rate) if split == "train" \
        else (torchvision_val_rate, ffcv_val_rate)
    rates = {}
    if "torchvision" not in args.skip:
        rates["torchvision"] = tv(folder, **common)
    if "stock" not in args.skip:
        rates["stock"] = ffcv(beton, decoder="stock", **common)
    if "ours" not in args.skip:
        rates["ours"] = ffcv(beton, decoder="scaled", **common)
    row = {"split": split, "resolution": res, "img_s": rates}
    for a, b in (("ours", "torchvision"), ("ours", "stock"), ("stock", "torchvision")):
        if a in rates and b in rates:
            row[f"{a}/{b}"] = rates[a] / rates[b]
    if split == "train":
        row["decode_bound"] = decode_bound(beton, res, args.bound_samples)
    return row


def format_row(row: dict) -> str:
    rates = "  ".join(f"{k} {v:,.0f}" for k, v in row["img_s"].items())
    ratios = "  ".join(f"{k} {v:.2f}x" for k, v in row.items() if "/" in k)
    text = f"{row['split']:5} {row['resolution']:3d} px  img/s: {rates}  |  {ratios}"
    if "decode_bound" in row:
        b = row["decode_bound"]
        text += (f"  |  decode bound {b['bound']:.2f}x (stock {b['stock_us']:.0f} us, ours "
                 f"{b['ours_us']:.0f} us; scales " + ", ".join(
                     f"1/{d} {b[f'scale_1/{d}']:.0%}" for d in (1, 2, 4, 8)) + ")")
    return text


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print images/s, ratios and the decode bound."""
    p = argparse.ArgumentParser(prog="qlnas bench loader", description=__doc__)
    p.add_argument("--images", default=None,
                   help="ImageFolder tree of JPEGs (default: generated from scikit-image photos)")
    p.add_argument("--count", type=int, default=2000, help="generated JPEGs (default 2000)")
    p.add_argument("--work-dir", default=None, help="where generated files go (default cache)")
    p.add_argument("--resolution", type=int, nargs="+", default=[160, 192, 224])
    p.add_argument("--split", nargs="+", default=["train", "val"], choices=("train", "val"),
                   help="train: random resized crop and flip; val: timm's centre crop")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs after the warm-up")
    p.add_argument("--bound-samples", type=int, default=2000, help="crops timed for the bound")
    p.add_argument("--skip", nargs="*", default=(), choices=("torchvision", "stock", "ours"))
    p.add_argument("--out", default=None,
                   help="also write loader.json (images/s, ratios, bound) to this folder")
    args = p.parse_args(argv)
    from qlnas.data.demo import default_cache_dir  # FFCV and numba: after --help
    from qlnas.data.writer import write_beton

    work = Path(args.work_dir) if args.work_dir else default_cache_dir() / "bench-loader"
    folder = Path(args.images) if args.images else make_jpegs(work / f"jpegs-{args.count}",
                                                              args.count)
    beton = work / f"{folder.name}.beton"
    if not beton.exists():
        write_beton(folder, beton, max_res=512, quality=90, workers=args.workers)
    print(f"{len(list(folder.rglob('*.jpg')))} JPEGs from {folder}, {args.workers} workers, "
          f"batch {args.batch_size}, {os.cpu_count()} cores, {args.epochs} timed epochs each")
    table = []
    for split in args.split:
        for res in args.resolution:
            row = measure(folder, beton, split, res, args)
            table.append(row)
            print(format_row(row))
    if args.out:
        from qlnas.bench.metrics import machine
        from qlnas.fileio import atomic_write_json

        result = {"machine": machine(), "images": len(list(folder.rglob("*.jpg"))),
                  "workers": args.workers, "batch_size": args.batch_size, "epochs": args.epochs,
                  "rows": table}
        path = Path(args.out) / "loader.json"
        atomic_write_json(result, path)
        print(f"wrote {path}")
    return 0
