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

log = logging.getLogger(__name__)

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina",
          "immunohistochemistry", "logo", "colorwheel", "horse", "cell", "camera")
SIZE = (500, 375)  # ImageNet's typical photo


def _photo(name: str) -> np.ndarray:
    from skimage import data

    img = getattr(data, name)()
    if img.dtype != np.uint8:
        img = (255 * (img.astype(np.float64) / max(1.0, float(img.max())))).astype(np.uint8)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])


def make_jpegs(root: str | os.PathLike, count: int = 2000, quality: int = 90,
               seed: int = 0, size: tuple[int, int] = SIZE, grain: float = 0.0) -> Path:
    """An ImageFolder tree of `count` JPEGs of `size` (500x375 by default): random crops of
    scikit-image's photos, one class per photo, with Gaussian `grain` (sensor noise, so that
    photos upscaled past their resolution are not unnaturally smooth). Reused when complete."""
    from PIL import Image

    root = Path(root)
    shape = "" if size == SIZE and not grain else f"-{size[0]}x{size[1]}-{grain:g}"
    stamp = root / f".complete-{count}-{quality}-{seed}{shape}"
    if stamp.exists():
        return root
    rng = np.random.default_rng(seed)
    photos = {}
    for name in PHOTOS:
        try:
            photos[name] = Image.fromarray(_photo(name))
        except Exception:  # a photo this scikit-image version lacks
            continue
    names = sorted(photos)
    for n in range(count):
        name = names[n % len(names)]
        img = photos[name]
        w, h = img.size
        frac = rng.uniform(0.5, 1.0)
        cw = min(w, int(frac * min(w, h * 4 / 3)))
        ch = min(h, int(cw * 3 / 4))
        x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        out = img.crop((x, y, x + cw, y + ch)).resize(size, Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if grain:
            noisy = np.asarray(out, np.float32) + rng.normal(0, grain, (size[1], size[0], 3))
            out = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        out.save(folder / f"{n:05d}.jpg", quality=quality)
    stamp.touch()
    return root


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
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    from qlnas.data.center_crop import DEFAULT_CROP_PCT, CenterCropDecoder
    from qlnas.data.loaders import _max_sample_bytes

    if decoder == "stock":
        op = CenterCropRGBImageDecoder((res, res), DEFAULT_CROP_PCT)
    else:
        op = CenterCropDecoder((res, res), DEFAULT_CROP_PCT,
                               max_jpeg_bytes=_max_sample_bytes(beton))
    loader = Loader(str(beton), batch_size=batch_size, num_workers=workers,
                    order=OrderOption.SEQUENTIAL, os_cache=True,
                    pipelines={"image": [op, ToTensor()], "label": [IntDecoder(), ToTensor()]})
    return _images_per_s(loader, epochs)


def ffcv_rate(beton: Path, res: int, batch_size: int, workers: int, epochs: int,
              decoder: str) -> float:
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, ToTensor

    from qlnas.data.decoders import ScaledRandomResizedCropDecoder
    from qlnas.data.loaders import _max_sample_bytes

    if decoder == "stock":
        op = RandomResizedCropRGBImageDecoder((res, res))
    else:
        op = ScaledRandomResizedCropDecoder((res, res), max_jpeg_bytes=_max_sample_bytes(beton))
    loader = Loader(str(beton), batch_size=batch_size, num_workers=workers,
                    order=OrderOption.RANDOM, drop_last=True, os_cache=True, seed=0,
                    pipelines={"image": [op, RandomHorizontalFlip(), ToTensor()],
                               "label": [IntDecoder(), ToTensor()]})
    return _images_per_s(loader, epochs)


def decode_bound(beton: Path, res: int, samples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Single-thread decode+resize cost of stock FFCV's path vs ours on the same random crops."""
    from ffcv.fields.rgb_image import get_random_crop
    from ffcv.reader import Reader

    from qlnas.data.decoders import decode_crop, decode_full

    reader = Reader(str(beton))
    meta = reader.metadata["f0"]
    sizes = dict(zip(reader.alloc_table["sample_id"], reader.alloc_table["ptr"], strict=True))
    lengths = dict(zip(reader.alloc_table["sample_id"], reader.alloc_table["size"], strict=True))
    raw = np.fromfile(str(beton), dtype=np.uint8)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, reader.num_samples, samples)
    jpegs, crops, dims = [], [], []
    np.random.seed(seed)
    for k in picks:
        if meta["mode"][k] != 0:
            continue
        ptr, size = int(sizes[k]), int(lengths[k])
        h, w = int(meta["height"][k]), int(meta["width"][k])
        jpegs.append(raw[ptr:ptr + size].copy())
        crops.append(get_random_crop(h, w, np.array((0.08, 1.0)), np.array((3 / 4, 4 / 3))))
        dims.append((h, w))
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
    from qlnas.data.demo import default_cache_dir
    from qlnas.data.writer import write_beton

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
        from qlnas.fileio import atomic_write_json
        from qlnas.models.bench import machine

        result = {"machine": machine(), "images": len(list(folder.rglob("*.jpg"))),
                  "workers": args.workers, "batch_size": args.batch_size, "epochs": args.epochs,
                  "rows": table}
        path = Path(args.out) / "loader.json"
        atomic_write_json(result, path)
        print(f"wrote {path}")
    return 0
