"""Train and val loaders over `.beton` files: FFCV pipelines behind a small, stable interface.

Each process gets `batch_size` images per batch; with `distributed=True` every rank reads a
disjoint share of each epoch. The order is a function of (seed, epoch, world size) alone, so a
resumed run (`set_epoch`) sees the same batches as an uninterrupted one. A file is read
`cached` (through the page cache the node's processes share) or `streamed` (a window of pages
per process, for files larger than memory): `qlnas.data.order`. A `num_workers` above the cores
this process may use (a recipe from a bigger machine) is lowered to them.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import replace
from typing import Any

import numba
import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
from ffcv.loader import OrderOption
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage

from qlnas.data.center_crop import DEFAULT_CROP_PCT, CenterCropDecoder
from qlnas.data.decoders import ScaledRandomResizedCropDecoder
from qlnas.data.guard import GuardedLoader
from qlnas.data.integrity import CorruptSamples, describe_samples, open_beton
from qlnas.data.order import PagedOrder, SeededOrder, resolve_mode, sample_pages, stream_window
from qlnas.errors import UserError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
DECODERS = ("scaled", "stock")


class NormalizeOnDevice(Operation):
    """uint8 NCHW (channels_last) -> float32 (x - mean) / std, computed on the tensor's device."""

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD) -> None:
        super().__init__()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def generate_code(self):
        mean, std = self.mean, self.std

        def normalize(images: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
            out = dst[:images.shape[0]].permute(0, 3, 1, 2)  # NHWC buffer seen as channels_last
            out.copy_(images)
            return out.sub_(mean).div_(std)

        return normalize

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        c, h, w = previous_state.shape
        self.mean = self.mean.to(previous_state.device)
        self.std = self.std.to(previous_state.device)
        return (replace(previous_state, dtype=torch.float32),
                AllocationQuery((h, w, c), torch.float32, previous_state.device))


class ImageLoader:
    """Iterable of (images float32 NCHW channels_last, labels int64) batches on `device`.

    Images live in FFCV's rotating buffers and are overwritten a few batches later: use them
    (or `.clone()` them) before moving on. Labels are copies and can be kept.

    A sample whose JPEG fails to decode stops the iteration with CorruptSamples naming it;
    with `skip_corrupt` its row is left out of its batch instead (a batch of nothing else is
    still an error) and it is counted in `skipped`. A loader thread that raises or dies ends
    the iteration with LoaderFailed (guard.py), never a hang.
    """

    def __init__(self, loader: GuardedLoader, order: SeededOrder | PagedOrder, decoder: Any,
                 resolution: int, train: bool, skip_corrupt: bool = False) -> None:
        self._loader = loader
        self.mode = "streamed" if isinstance(order, PagedOrder) else "cached"
        """How the file is read (qlnas.data.order)."""
        self._decoder = decoder
        self._resolution = resolution
        self._train = train
        self._stale = False
        self.skip_corrupt = skip_corrupt
        self.skipped: set[int] = set()
        """Samples (indices in the file) left out because they failed to decode."""
        loader.traversal_order = order
        loader.first_traversal_order = order.sample_order(0)
        self.num_samples = len(loader.first_traversal_order)  # this rank's samples per epoch

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self):
        if self._stale:  # a new output size: FFCV re-plans its buffers and recompiles
            self._loader.generate_code()
            self._stale = False
        size = self._loader.batch_size
        order = self._loader.traversal_order.sample_order(self._loader.next_epoch)
        batches = iter(self._loader)
        failures = getattr(self._decoder, "failures", None)  # the scaled decoders report them
        try:
            for k, (images, labels) in enumerate(batches):
                if failures is not None and failures.any():
                    indices = order[k * size:k * size + len(labels)].astype(np.int64)
                    bad = failures.flags[indices] != 0
                    if bad.any():
                        images, labels = self._without(images, labels, indices, bad)
                        if images is None:
                            continue
                yield images, labels.clone()
        finally:
            batches.close()

    def _without(self, images, labels, indices, bad):
        """The batch without its damaged samples (None when none is left and this is
        evaluation); CorruptSamples unless skipping them."""
        path = self._loader.reader.file_name
        damaged = indices[bad]
        if not self.skip_corrupt:
            raise CorruptSamples(f"{path}: {describe_samples(path, damaged)} failed to decode "
                                 "(the file is damaged: `qlnas data info --verify` lists every "
                                 "bad sample); write it again, or pass --skip-corrupt to train "
                                 "without them")
        new = set(damaged.tolist()) - self.skipped
        if new:
            log.warning("%s: left out %s (failed to decode; %d so far)", path,
                        describe_samples(path, new), len(self.skipped) + len(new))
        self.skipped |= new
        keep = torch.from_numpy(np.flatnonzero(~bad)).to(labels.device)
        if len(keep) == 0:
            if self._train:
                raise CorruptSamples(f"{path}: every sample of a batch failed to decode "
                                     f"({describe_samples(path, damaged)})")
            return None, None
        return images.index_select(0, keep), labels.index_select(0, keep)

    @property
    def batch_size(self) -> int:
        return self._loader.batch_size

    @property
    def resolution(self) -> int:
        return self._resolution

    @property
    def epoch(self) -> int:
        """The epoch whose order the next iteration uses."""
        return self._loader.next_epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration use the order of `epoch`."""
        self._loader.next_epoch = int(epoch)

    def set_resolution(self, resolution: int) -> None:
        """Output size (pixels per side) from the next iteration on; train loaders only."""
        if not self._train:
            raise TypeError("set_resolution is for train loaders (val decodes a fixed size)")
        resolution = int(resolution)
        if resolution != self._resolution:
            self._decoder.output_size = (resolution, resolution)
            self._resolution = resolution
            self._stale = True


def resolution_for_epoch(epoch: int, *, min_res: int, max_res: int, end_ramp: int,
                         start_ramp: int = 0, step: int = 32) -> int:
    """Progressive resizing: min_res up to start_ramp, a linear ramp to max_res at end_ramp,
    rounded to a multiple of `step` (FFCV's ImageNet recipe) within [min_res, max_res] (160 to
    216 would otherwise train at 224, above the resolution memory was planned for)."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    res = np.interp(epoch, [start_ramp, end_ramp], [min_res, max_res])
    return min(max(int(round(res / step)) * step, min_res), max_res)


def _rank_world(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError("distributed=True needs an initialised torch.distributed process group")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _check_file(path: str | os.PathLike) -> str:
    """`path` once its structure is whole (one DamagedFile line otherwise)."""
    path = os.fspath(path)
    open_beton(path)
    return path


def _available_cores() -> tuple[int, str]:
    """How many loader threads this process can run, and what sets the limit: the cores it
    may use (its CPU affinity), or numba's thread pool when NUMBA_NUM_THREADS is smaller."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks (macOS)
        cores = os.cpu_count() or 1
    limit, reason = max(1, cores), f"the {cores} core{'s' if cores > 1 else ''} available"
    if numba.config.NUMBA_NUM_THREADS < limit:
        limit = numba.config.NUMBA_NUM_THREADS
        reason = f"NUMBA_NUM_THREADS={limit} allows"
    return limit, reason


@functools.cache
def _warn_clamped(requested: int, limit: int, reason: str) -> None:
    log.warning("workers=%d is more than %s; using %d", requested, reason, limit)


def _loader_threads(num_workers: int) -> int:
    """`num_workers`, at most what the machine can run (numba refuses more threads than it
    has; the recipe may come from a bigger machine)."""
    if num_workers < 1:
        raise UserError(f"workers={num_workers}: expected at least 1 loader thread")
    limit, reason = _available_cores()
    if num_workers > limit:
        _warn_clamped(num_workers, limit, reason)  # once per process, not once per loader
        return limit
    return num_workers


def _check_device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise UserError(f"device={device!r}: {exc}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"device={device}: CUDA is not available on this machine")
        if device.index is not None and device.index >= count:
            raise UserError(f"device={device}: this machine has {count} CUDA device(s)")
    return device


def _build(path: str, decoder: Operation, *, batch_size: int, device: str | torch.device,
           mode: str, distributed: bool, shuffle: bool, seed: int, num_workers: int,
           drop_last: bool, flip: bool, resolution: int, train: bool,
           skip_corrupt: bool) -> ImageLoader:
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size}: expected at least 1 image per batch")
    num_workers = _loader_threads(num_workers)
    device = _check_device(device)
    rank, world = _rank_world(distributed)
    mode = resolve_mode(mode, path, distributed)
    image = [decoder] + ([RandomHorizontalFlip()] if flip else [])
    image += [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(channels_last=True),
              NormalizeOnDevice()]
    # Squeeze(1), not Squeeze(): a last batch of one sample keeps its batch dimension.
    label = [IntDecoder(), ToTensor(), Squeeze(1), ToDevice(device, non_blocking=True)]
    loader = GuardedLoader(path, batch_size=batch_size, num_workers=num_workers,
                           os_cache=mode == "cached", order=OrderOption.SEQUENTIAL,
                           drop_last=drop_last, pipelines={"image": image, "label": label})
    shares = dict(shuffle=shuffle, seed=seed, rank=rank, world=world, equal_shares=train)
    if mode == "cached":
        order = SeededOrder(loader.reader.num_samples, **shares)
    else:
        order = PagedOrder(sample_pages(loader.reader), **shares,
                           window=stream_window(batch_size, loader.reader.page_size))
    return ImageLoader(loader, order, decoder, resolution, train, skip_corrupt)


def build_train_loader(path: str | os.PathLike, *, batch_size: int, resolution: int,
                       device: str | torch.device = "cpu", distributed: bool = False,
                       seed: int = 0, num_workers: int = 2, decoder: str = "scaled",
                       drop_last: bool = True, scale: tuple[float, float] = (0.08, 1.0),
                       flip: bool = True, skip_corrupt: bool = False,
                       mode: str = "auto") -> ImageLoader:
    """Random-resized-crop, flip and normalise `path` into shuffled training batches.

    `decoder="scaled"` (default) decodes each JPEG only as far as the crop needs, with crops
    and flips drawn from per-sample seeded streams (same seed, epoch and world size: the same
    batches); `"stock"` is FFCV's RandomResizedCropRGBImageDecoder (augmentation unseeded).
    `mode`: `cached`, `streamed` or `auto` (qlnas.data.order).
    """
    path = _check_file(path)
    if decoder not in DECODERS:
        raise UserError(f"decoder {decoder!r}: expected one of {', '.join(DECODERS)}")
    size = (int(resolution), int(resolution))
    if decoder == "scaled":
        # Crops and flips drawn per sample from seeded streams: reproducible batches.
        op = ScaledRandomResizedCropDecoder(size, scale=tuple(scale), seed=seed, flip=flip,
                                            max_jpeg_bytes=_max_sample_bytes(path))
    else:
        op = RandomResizedCropRGBImageDecoder(size, scale=tuple(scale))
    return _build(path, op, batch_size=batch_size, device=device, mode=mode,
                  distributed=distributed, shuffle=True, seed=seed,
                  num_workers=num_workers, drop_last=drop_last,
                  flip=flip and decoder == "stock",  # ours flips inside the decoder
                  resolution=int(resolution), train=True, skip_corrupt=skip_corrupt)


def build_val_loader(path: str | os.PathLike, *, batch_size: int, resolution: int,
                     device: str | torch.device = "cpu", distributed: bool = False,
                     num_workers: int = 2, crop_pct: float = DEFAULT_CROP_PCT,
                     decoder: str = "scaled", skip_corrupt: bool = False,
                     mode: str = "auto") -> ImageLoader:
    """timm's evaluation crop of `path` (shorter side resized to resolution / crop_pct, the
    centre resolution x resolution kept), normalised, in file order, keeping the last batch.

    `crop_pct` is the model's (`val_crop_pct`). `decoder="scaled"` gives timm's pixels up to
    JPEG-decoder noise, decoding only what the crop needs; `"stock"` is FFCV's centre crop
    (ratio crop_pct of the shorter side, area interpolation). With `distributed=True` each
    sample is read by exactly one rank, so ranks may differ by one batch: sum metrics over
    ranks after the loop, and evaluate the unwrapped model (a DDP forward could wait on a rank
    that has finished). `mode` as for build_train_loader.
    """
    path = _check_file(path)
    if decoder not in DECODERS:
        raise UserError(f"decoder {decoder!r}: expected one of {', '.join(DECODERS)}")
    if not 0.0 < crop_pct <= 1.0:
        raise UserError(f"crop_pct={crop_pct}: expected 0 < crop_pct <= 1")
    size = (int(resolution), int(resolution))
    if decoder == "scaled":
        op = CenterCropDecoder(size, crop_pct=crop_pct, max_jpeg_bytes=_max_sample_bytes(path))
    else:
        op = CenterCropRGBImageDecoder(size, ratio=crop_pct)
    return _build(path, op, batch_size=batch_size, device=device, mode=mode,
                  distributed=distributed, shuffle=False, seed=0,
                  num_workers=num_workers, drop_last=False, flip=False,
                  resolution=int(resolution), train=False, skip_corrupt=skip_corrupt)


def val_crop_pct(model: torch.nn.Module) -> float:
    """The model's evaluation crop_pct (its timm pretrained_cfg / default_cfg), else timm's
    default 0.875."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return float(cfg.get("crop_pct") or DEFAULT_CROP_PCT)


def _max_sample_bytes(path: str) -> int:
    """The largest allocation in the file: a bound on any one sample's JPEG size."""
    return int(open_beton(path).alloc_table["size"].max())
