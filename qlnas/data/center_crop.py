"""Validation images as timm makes them, decoded at reduced cost.

timm's eval transform (`create_transform(..., is_training=False)`) resizes the shorter side to
floor(size / crop_pct) with PIL's antialiased bilinear filter and keeps the centre size x size.
That equals resampling one source rectangle straight to size x size with the same filter
(PIL computes each output pixel from its centre and the scale alone), so this decoder
1. finds that rectangle (`center_box`, torchvision's rounding included),
2. decodes only the JPEG rows and restart segments under it and the filter's reach, at the
   coarsest DCT scale that still has a source pixel per output pixel (`decode_region`), and
3. resamples with PIL's filter in PIL's fixed-point arithmetic (`resample_box`), so a full-scale
   decode gives timm's pixels up to the JPEG decoder's own rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES
from ffcv.pipeline.compiler import Compiler
from numba import njit

from qlnas.data.decoders import (
    ScaledResizedCropDecoder,
    coarsest_scale,
    decode_region,
    make_kernels,
)

DEFAULT_CROP_PCT = 0.875  # timm's default, and our models' default_cfg
PRECISION_BITS = 32 - 8 - 2  # PIL's fixed-point resampling (Resample.c, 8 bits per channel)


@njit(nogil=True)
def center_box(height: int, width: int, size: int, crop_pct: float,
               box: np.ndarray) -> None:
    """`box` = (top, left, bottom, right) in source pixels (floats) of what timm's
    Resize(floor(size / crop_pct)) + CenterCrop(size) keeps of a height x width image."""
    short_side = np.floor(size / crop_pct)
    if width <= height:  # torchvision: the shorter side to short_side, the longer truncated
        new_w, new_h = short_side, np.floor(short_side * height / width)
    else:
        new_h, new_w = short_side, np.floor(short_side * width / height)
    top = round((new_h - size) / 2.0)
    left = round((new_w - size) / 2.0)
    fy, fx = height / new_h, width / new_w
    box[0], box[1] = top * fy, left * fx
    box[2], box[3] = (top + size) * fy, (left + size) * fx


@njit(nogil=True)
def filter_weights(in_size: int, start: float, end: float,
                   out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """PIL's bilinear (triangle) filter taps for resampling [start, end) of `in_size` source
    pixels to `out_size`: per output pixel the first source pixel and count, and the weights in
    fixed point (PIL's precompute_coeffs and normalize_coeffs_8bpc)."""
    scale = (end - start) / out_size
    filterscale = max(scale, 1.0)
    support = filterscale  # the triangle's support is 1, widened when shrinking (antialias)
    ksize = int(np.ceil(support)) * 2 + 1
    bounds = np.zeros((out_size, 2), np.int64)
    weights = np.zeros((out_size, ksize), np.int64)
    taps = np.zeros(ksize)
    for x in range(out_size):
        center = start + (x + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        count = min(int(center + support + 0.5), in_size) - xmin
        total = 0.0
        for k in range(count):
            taps[k] = max(0.0, 1.0 - abs((k + xmin - center + 0.5) / filterscale))
            total += taps[k]
        for k in range(count):
            w = taps[k] / total if total != 0.0 else taps[k]
            weights[x, k] = int(0.5 + w * (1 << PRECISION_BITS))
        bounds[x, 0], bounds[x, 1] = xmin, count
    return bounds, weights


@njit(nogil=True)
def _clip8(acc: int) -> np.uint8:
    return np.uint8(min(255, max(0, acc >> PRECISION_BITS)))


@njit(nogil=True)
def resample_box(src: np.ndarray, top: float, left: float, bottom: float, right: float,
                 dst: np.ndarray) -> None:
    """Resample the rectangle (float source pixels) of the HxWx3 `src` into `dst` as PIL's
    `Image.resize(dst_size, BILINEAR, box)` does: rows first into 8 bits, then columns."""
    out_h, out_w = dst.shape[0], dst.shape[1]
    xb, xw = filter_weights(src.shape[1], left, right, out_w)
    yb, yw = filter_weights(src.shape[0], top, bottom, out_h)
    first = yb[0, 0]
    last = yb[out_h - 1, 0] + yb[out_h - 1, 1]
    half = np.int64(1) << (PRECISION_BITS - 1)
    rows = np.empty((last - first, out_w, 3), np.uint8)
    for y in range(first, last):
        for x in range(out_w):
            x0, n = xb[x, 0], xb[x, 1]
            r, g, b = half, half, half
            for k in range(n):
                weight = xw[x, k]
                r += np.int64(src[y, x0 + k, 0]) * weight
                g += np.int64(src[y, x0 + k, 1]) * weight
                b += np.int64(src[y, x0 + k, 2]) * weight
            rows[y - first, x, 0], rows[y - first, x, 1] = _clip8(r), _clip8(g)
            rows[y - first, x, 2] = _clip8(b)
    for y in range(out_h):
        y0, n = yb[y, 0] - first, yb[y, 1]
        for x in range(out_w):
            r, g, b = half, half, half
            for k in range(n):
                weight = yw[y, k]
                r += np.int64(rows[y0 + k, x, 0]) * weight
                g += np.int64(rows[y0 + k, x, 1]) * weight
                b += np.int64(rows[y0 + k, x, 2]) * weight
            dst[y, x, 0], dst[y, x, 1], dst[y, x, 2] = _clip8(r), _clip8(g), _clip8(b)


@njit(nogil=True)
def decode_center(data: np.ndarray, height: int, width: int, crop_pct: float,
                  pixels: np.ndarray, cut_jpeg: np.ndarray, seg_starts: np.ndarray,
                  destination: np.ndarray, cut_segments: bool, dct_scaling: bool) -> int:
    """timm's eval crop of the height x width JPEG `data` into `destination` (size x size x 3).
    Returns the DCT scale denominator used, 0 for a damaged JPEG."""
    size = destination.shape[0]
    box = np.zeros(4)
    center_box(height, width, size, crop_pct, box)
    reach = max(1.0, (box[2] - box[0]) / size) + 1  # the filter's support, and a pixel
    i = max(0, int(box[0] - reach))
    j = max(0, int(box[1] - reach))
    h = min(height, int(np.ceil(box[2] + reach))) - i
    w = min(width, int(np.ceil(box[3] + reach))) - j
    d = 1
    if dct_scaling:
        d = coarsest_scale(int(box[2] - box[0]), int(box[3] - box[1]), size, size)
    image, y0, x0, status = decode_region(data, height, width, i, j, h, w, d, pixels, cut_jpeg,
                                          seg_starts, cut_segments)
    if status != 0:
        return 0
    resample_box(image, (box[0] - y0) / d, (box[1] - x0) / d, (box[2] - y0) / d,
                 (box[3] - x0) / d, destination)
    return d


class CenterCropDecoder(ScaledResizedCropDecoder):
    """timm's evaluation crop (`crop_pct`, PIL's bilinear filter) for `RGBImageField`, decoding
    only the rows and segments under the crop; `dct_scaling=False` decodes at full scale
    (timm's pixels up to JPEG-decoder rounding, slower when the crop shrinks by 2x or more)."""

    def __init__(self, output_size: tuple[int, int], crop_pct: float = DEFAULT_CROP_PCT,
                 max_jpeg_bytes: int | None = None, cut_segments: bool = True,
                 dct_scaling: bool = True) -> None:
        if output_size[0] != output_size[1]:
            raise ValueError(f"output_size {output_size}: timm's centre crop is square")
        if not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"crop_pct {crop_pct}: expected 0 < crop_pct <= 1")
        super().__init__(output_size, max_jpeg_bytes, cut_segments)
        self.crop_pct = float(crop_pct)
        self.dct_scaling = bool(dct_scaling)

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        kernels = make_kernels((center_box, filter_weights, _clip8, resample_box, decode_center))
        decode_center_c, resample_c = kernels.decode_center, kernels.resample_box
        center_box_c = kernels.center_box
        crop_pct, cut_segments, dct_scaling = self.crop_pct, self.cut_segments, self.dct_scaling
        mark_failed_c = kernels.mark_failed
        failures = self.failure_flags()
        flags_at, flags_size = failures.address, failures.size

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, pixels, cut_jpegs, seg_starts = my_storage
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                data = mem_read(field["data_ptr"], storage_state)
                height = np.int64(field["height"])
                width = np.int64(field["width"])
                out = destination[dst_ix]
                if field["mode"] == jpg:
                    if decode_center_c(data, height, width, crop_pct, pixels[dst_ix],
                                       cut_jpegs[dst_ix], seg_starts[dst_ix], out, cut_segments,
                                       dct_scaling) == 0:
                        mark_failed_c(flags_at, flags_size, np.int64(batch_indices[dst_ix]))
                        out[:] = 0
                else:
                    box = np.zeros(4)
                    center_box_c(height, width, out.shape[0], crop_pct, box)
                    resample_c(data.reshape(height, width, 3), box[0], box[1], box[2], box[3],
                               out)
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode
