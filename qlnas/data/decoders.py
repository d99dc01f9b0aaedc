"""A random-resized-crop decoder that decodes only what the crop needs.

FFCV's decoder turns each JPEG into full-size pixels and then crops. This one
1. cuts the crop's MCU rows and restart segments out of the entropy-coded data (the writer puts
   a restart marker every few MCUs, so segments are independent; a byte copy, no decoding), and
2. decodes that smaller JPEG at the coarsest DCT scale (1/8, 1/4, 1/2, 1) whose crop still covers
   the output size (libjpeg-turbo scales inside the inverse DCT), and
3. resizes the remaining < 2x bilinearly (FFCV uses OpenCV's much slower area interpolation).
JPEGs without restart markers (or progressive ones) take step 2 alone on the whole image.
"""

from __future__ import annotations

import ctypes
import types
from collections.abc import Callable
from dataclasses import replace

import ffcv._libffcv
import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder, get_random_crop
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.state import State
from llvmlite import ir
from numba import njit
from numba import types as nb_types
from numba.extending import intrinsic

SCALES = (8, 4, 2, 1)  # DCT scale denominators, coarsest first
MIN_MCU = 16  # the segment table is sized for MCUs of at least 16x16 (4:2:0); else fallback
# parse_jpeg's info slots
SOF, DATA, INTERVAL, MCU_W, MCU_H, HEIGHT, WIDTH = range(7)


@njit(nogil=True)
def parse_jpeg(data: np.ndarray, info: np.ndarray) -> bool:
    """Read a baseline JPEG's header into `info`; False for formats the segment cut cannot use."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return False
    pos = 2
    info[SOF] = -1
    info[INTERVAL] = 0
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = (np.int64(data[pos + 2]) << 8) | np.int64(data[pos + 3])
        if marker == 0xC0 or marker == 0xC1:  # baseline / extended sequential Huffman
            if pos + 10 > n:
                return False
            info[SOF] = pos
            info[HEIGHT] = (np.int64(data[pos + 5]) << 8) | np.int64(data[pos + 6])
            info[WIDTH] = (np.int64(data[pos + 7]) << 8) | np.int64(data[pos + 8])
            ncomp = np.int64(data[pos + 9])
            if pos + 10 + 3 * ncomp > n:
                return False
            hmax = 1
            vmax = 1
            if ncomp > 1:
                for c in range(ncomp):
                    factors = np.int64(data[pos + 11 + 3 * c])
                    hmax = max(hmax, factors >> 4)
                    vmax = max(vmax, factors & 15)
            info[MCU_W] = 8 * hmax
            info[MCU_H] = 8 * vmax
        elif 0xC2 <= marker <= 0xCF and marker != 0xC4 and marker != 0xC8 and marker != 0xCC:
            return False  # progressive, lossless or arithmetic coding
        elif marker == 0xDD:
            if pos + 6 > n:
                return False
            info[INTERVAL] = (np.int64(data[pos + 4]) << 8) | np.int64(data[pos + 5])
        elif marker == 0xDA:
            info[DATA] = pos + 2 + length
            return info[SOF] >= 0 and info[INTERVAL] > 0
        pos += 2 + length
    return False


@njit(nogil=True)
def find_segments(data: np.ndarray, start: int, last: int, starts: np.ndarray) -> int:
    """Entropy-data offsets of restart segments 0..last (`starts[s]`; segment s ends 2 bytes
    before `starts[s + 1]`). Returns how many segments were found (stops after `last`)."""
    n = len(data)
    s = 0
    starts[0] = start
    i = start
    while i + 1 < n:
        if data[i] != 0xFF:
            i += 1
            continue
        b = data[i + 1]
        if b == 0x00:  # stuffed 0xFF data byte
            i += 2
        elif b == 0xFF:  # fill byte before a marker
            i += 1
        elif 0xD0 <= b <= 0xD7:  # restart marker: next segment
            s += 1
            if s >= len(starts):
                return 0
            starts[s] = i + 2
            if s > last:
                return s
            i += 2
        else:  # end of image (or another marker): the last segment ends here
            if s + 1 >= len(starts):
                return 0
            starts[s + 1] = i + 2
            return s + 1
    return 0


@njit(nogil=True)
def cut_region(data: np.ndarray, info: np.ndarray, starts: np.ndarray, out: np.ndarray,
               i: int, j: int, h: int, w: int, region: np.ndarray) -> int:
    """Write to `out` a JPEG of the MCU rows and restart segments covering rows i..i+h and
    columns j..j+w; `region` gets its (y0, x0, height, width). Returns its size, 0 if unusable."""
    height = info[HEIGHT]
    width = info[WIDTH]
    mcu_w = info[MCU_W]
    mcu_h = info[MCU_H]
    interval = info[INTERVAL]
    mcus_x = (width + mcu_w - 1) // mcu_w
    mcus_y = (height + mcu_h - 1) // mcu_h
    if mcus_x % interval != 0:
        return 0  # segments do not tile the rows
    per_row = mcus_x // interval
    seg_w = interval * mcu_w
    r0 = i // mcu_h
    r1 = min(mcus_y, (i + h + mcu_h - 1) // mcu_h)
    c0 = j // seg_w
    c1 = min(per_row, (j + w + seg_w - 1) // seg_w)
    last = (r1 - 1) * per_row + c1 - 1
    found = find_segments(data, info[DATA], last, starts)
    if found <= last:
        return 0
    y0 = r0 * mcu_h
    x0 = c0 * seg_w
    new_h = min(height - y0, (r1 - r0) * mcu_h)
    new_w = min(width - x0, (c1 - c0) * seg_w)
    head = info[DATA]
    if head + 2 > len(out):
        return 0
    out[:head] = data[:head]
    sof = info[SOF]
    out[sof + 5] = new_h >> 8
    out[sof + 6] = new_h & 255
    out[sof + 7] = new_w >> 8
    out[sof + 8] = new_w & 255
    p = head
    m = 0
    for r in range(r0, r1):
        for c in range(c0, c1):
            s = r * per_row + c
            a = starts[s]
            b = starts[s + 1] - 2
            if p + (b - a) + 4 > len(out):
                return 0
            if m > 0:
                out[p] = 0xFF
                out[p + 1] = 0xD0 + ((m - 1) & 7)
                p += 2
            out[p:p + b - a] = data[a:b]
            p += b - a
            m += 1
    out[p] = 0xFF
    out[p + 1] = 0xD9
    region[0] = y0
    region[1] = x0
    region[2] = new_h
    region[3] = new_w
    return p + 2


@njit(nogil=True)
def coarsest_scale(h: int, w: int, out_h: int, out_w: int) -> int:
    """The largest DCT scale denominator at which an h x w crop still covers out_h x out_w."""
    for d in SCALES:
        if h >= d * out_h and w >= d * out_w:
            return d
    return 1


imdecode_nb = njit(nogil=True)(imdecode)
resize_crop_nb = njit(nogil=True)(resize_crop)

# OpenCV's C API, reached through the library FFCV's extension already links.
_opencv = ctypes.CDLL(ffcv._libffcv.__file__)
_cv_init_mat = _opencv.cvInitMatHeader
_cv_init_mat.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                         ctypes.c_void_p, ctypes.c_int]
_cv_init_mat.restype = ctypes.c_void_p
_cv_resize = _opencv.cvResize
_cv_resize.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
_cv_resize.restype = None
CV_8UC3, INTER_LINEAR, INTER_AREA = 16, 1, 3
_CVMAT_BYTES = 128  # room for one CvMat header (48 bytes on 64-bit)


@njit(nogil=True)
def resize_region(src: np.ndarray, top: int, bottom: int, left: int, right: int,
                  dst: np.ndarray) -> None:
    """Resize rows top..bottom, columns left..right of the HxWx3 `src` into `dst`: bilinear
    when shrinking by less than 2x (what the DCT scale leaves), else area averaging."""
    h = bottom - top
    w = right - left
    interpolation = INTER_LINEAR
    if h >= 2 * dst.shape[0] or w >= 2 * dst.shape[1]:
        interpolation = INTER_AREA
    headers = np.zeros(2 * _CVMAT_BYTES // 8, np.int64)
    stride = src.shape[1] * 3
    _cv_init_mat(headers.ctypes.data, h, w, CV_8UC3, src.ctypes.data + top * stride + left * 3,
                 stride)
    _cv_init_mat(headers.ctypes.data + _CVMAT_BYTES, dst.shape[0], dst.shape[1], CV_8UC3,
                 dst.ctypes.data, dst.shape[1] * 3)
    _cv_resize(headers.ctypes.data, headers.ctypes.data + _CVMAT_BYTES, interpolation)


@njit(nogil=True)
def decode_region(data: np.ndarray, height: int, width: int, i: int, j: int, h: int, w: int,
                  d: int, pixels: np.ndarray, cut_jpeg: np.ndarray, seg_starts: np.ndarray,
                  cut_segments: bool) -> tuple[np.ndarray, int, int, int]:
    """Decode at 1/d scale the MCU rows and restart segments of the height x width JPEG `data`
    that cover rows i..i+h, columns j..j+w (the whole image when it cannot be cut). Returns the
    decoded pixels (a view of the scratch buffer `pixels`), the full-scale row and column of
    their first pixel, and the decoder's status (0: decoded; else the JPEG is damaged and the
    pixels are not an image). `cut_jpeg` and `seg_starts` are scratch buffers too."""
    info = np.zeros(7, np.int64)
    region = np.zeros(4, np.int64)
    size = 0
    if cut_segments and parse_jpeg(data, info):
        size = cut_region(data, info, seg_starts, cut_jpeg, i, j, h, w, region)
    status = -1
    y0, x0, rh, rw = np.int64(0), np.int64(0), np.int64(0), np.int64(0)
    if size > 0:
        y0, x0, rh, rw = region[0], region[1], region[2], region[3]
        status = imdecode_nb(cut_jpeg[:size], pixels, rh, rw, rh, rw, 0, 0, 1, d, False, False)
    if status != 0:  # the whole image, scaled
        y0, x0, rh, rw = np.int64(0), np.int64(0), np.int64(height), np.int64(width)
        status = imdecode_nb(data, pixels, rh, rw, rh, rw, 0, 0, 1, d, False, False)
    sh = (rh + d - 1) // d
    sw = (rw + d - 1) // d
    return pixels[:3 * sh * sw].reshape(sh, sw, 3), y0, x0, status


@njit(nogil=True)
def decode_crop(data: np.ndarray, height: int, width: int, i: int, j: int, h: int, w: int,
                pixels: np.ndarray, cut_jpeg: np.ndarray, seg_starts: np.ndarray,
                destination: np.ndarray, cut_segments: bool) -> int:
    """Decode rows i..i+h, columns j..j+w of the height x width JPEG `data`, resized into
    `destination` (out_h x out_w x 3). `pixels`, `cut_jpeg`, `seg_starts` are scratch buffers.
    Returns the DCT scale denominator used (for statistics), 0 for a damaged JPEG (then
    `destination` is left as it was)."""
    d = coarsest_scale(h, w, destination.shape[0], destination.shape[1])
    image, y0, x0, status = decode_region(data, height, width, i, j, h, w, d, pixels, cut_jpeg,
                                          seg_starts, cut_segments)
    if status != 0:
        return 0
    sh, sw = image.shape[0], image.shape[1]
    top = min(sh - 1, np.int64(round((i - y0) / d)))
    left = min(sw - 1, np.int64(round((j - x0) / d)))
    bottom = max(top + 1, min(sh, np.int64(round((i + h - y0) / d))))
    right = max(left + 1, min(sw, np.int64(round((j + w - x0) / d))))
    resize_region(image, top, bottom, left, right, destination)
    return d


@njit(nogil=True)
def decode_full(data: np.ndarray, height: int, width: int, i: int, j: int, h: int, w: int,
                pixels: np.ndarray, destination: np.ndarray) -> int:
    """Stock FFCV's path (the reference): decode at full size, crop, resize. Returns 1."""
    imdecode_nb(data, pixels, height, width, height, width, 0, 0, 1, 1, False, False)
    image = pixels[:3 * height * width].reshape(height, width, 3)
    resize_crop_nb(image, i, i + h, j, j + w, destination)
    return 1


@intrinsic
def _set_byte(typingctx, address, offset):
    """Store 1 at address + offset: memory the compiled pipeline does not own (numba freezes an
    array a pipeline captures into a read-only constant)."""
    def codegen(context, builder, signature, args):
        target = builder.inttoptr(builder.add(args[0], args[1]), ir.IntType(8).as_pointer())
        builder.store(ir.Constant(ir.IntType(8), 1), target)
        return context.get_dummy_value()
    return nb_types.void(nb_types.int64, nb_types.int64), codegen


@njit(nogil=True)
def mark_failed(address: int, size: int, sample: int) -> None:
    """Flag `sample` in a FailureFlags' memory (and its any-failure byte, the last)."""
    _set_byte(np.int64(address), np.int64(sample))
    _set_byte(np.int64(address), np.int64(size - 1))


class FailureFlags:
    """Which samples of a file failed to decode: one byte per sample, written by the decoding
    threads, and one more set by any failure (so a batch's check costs one byte)."""

    def __init__(self, num_samples: int) -> None:
        self.flags = np.zeros(num_samples + 1, np.uint8)
        self.address = np.int64(self.flags.ctypes.data)
        self.size = np.int64(len(self.flags))

    def any(self) -> bool:
        return bool(self.flags[-1])

    def samples(self) -> np.ndarray:
        """The indices (in the file) of the samples that failed."""
        return np.flatnonzero(self.flags[:-1])


KERNELS = ("parse_jpeg", "find_segments", "cut_region", "coarsest_scale", "resize_region",
           "decode_region", "decode_crop", "decode_full", "mark_failed")


def make_kernels(extra: tuple[Callable, ...] = ()) -> types.SimpleNamespace:
    """A fresh set of the numba kernels above, and of the `extra` ones (kernels of another
    module that call these), one per compiled pipeline.

    Numba drops a shared callee's compiled overloads when a caller that used them is freed
    (a KeyError in the next pipeline), so each pipeline gets its own dispatchers, as FFCV's
    own decoders do.
    """
    scope = dict(globals())
    for kernel in extra:  # the names their module sees
        scope.update((k, v) for k, v in kernel.py_func.__globals__.items() if k not in scope)
    scope["imdecode_nb"] = njit(nogil=True)(imdecode)
    scope["resize_crop_nb"] = njit(nogil=True)(resize_crop)
    names = [*KERNELS, *(kernel.py_func.__name__ for kernel in extra)]
    for name in names:
        py = scope[name].py_func
        fresh = types.FunctionType(py.__code__, scope, name, py.__defaults__, py.__closure__)
        scope[name] = njit(nogil=True)(fresh)
    return types.SimpleNamespace(**{name: scope[name] for name in names})


class ScaledResizedCropDecoder(SimpleRGBImageDecoder):
    """Crop-and-resize decoder for `RGBImageField` that decodes as little of each JPEG as the
    crop needs. Subclasses choose the crop (`get_crop`).

    It subclasses FFCV's default image decoder because FFCV recognises a pipeline's decoder
    by that type."""

    def __init__(self, output_size: tuple[int, int], max_jpeg_bytes: int | None = None,
                 cut_segments: bool = True, seed: int = 0, flip: bool = False) -> None:
        super().__init__()
        self.seed = int(seed)
        self.flip = bool(flip)
        self.output_size = output_size
        self.max_jpeg_bytes = max_jpeg_bytes
        self.cut_segments = cut_segments
        self.scale: tuple[float, float] | float | None = None
        self.ratio: tuple[float, float] | float | None = None
        self.failures: FailureFlags | None = None
        """The samples whose JPEG failed to decode (their output is zeros), once compiled."""

    def failure_flags(self) -> FailureFlags:
        """This decoder's FailureFlags, made once per file (kept across recompilations)."""
        if self.failures is None or self.failures.size != len(self.metadata) + 1:
            self.failures = FailureFlags(len(self.metadata))
        return self.failures

    get_crop: Callable

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple]:
        max_h = int(self.metadata["height"].max())
        max_w = int(self.metadata["width"].max())
        out_shape = (self.output_size[0], self.output_size[1], 3)
        jpeg_bytes = self.max_jpeg_bytes or 3 * max_h * max_w
        segments = (-(-max_h // MIN_MCU)) * (-(-max_w // MIN_MCU)) + 2
        u1 = np.dtype("<u1")
        return (
            replace(previous_state, jit_mode=True, shape=out_shape, dtype=u1),
            (AllocationQuery(out_shape, u1),
             AllocationQuery((3 * max_h * max_w,), u1),  # decoded pixels
             AllocationQuery((jpeg_bytes + 64,), u1),  # the cut-out JPEG
             AllocationQuery((segments,), np.dtype("<i8"))),  # restart segment offsets
        )

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        resize_crop_c = Compiler.compile(resize_crop)
        kernels = make_kernels()
        decode_crop, mark_failed_c = kernels.decode_crop, kernels.mark_failed
        failures = self.failure_flags()
        flags_at, flags_size = failures.address, failures.size
        get_crop_c = Compiler.compile(type(self).get_crop)
        scale = np.array(self.scale) if isinstance(self.scale, tuple) else self.scale
        ratio = np.array(self.ratio) if isinstance(self.ratio, tuple) else self.ratio
        cut_segments = self.cut_segments
        seed = np.int64(self.seed % 1_000_003)
        flip = self.flip

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, pixels, cut_jpegs, seg_starts = my_storage
            # Reproducible augmentation whatever thread decodes a sample: each sample's random
            # crop draws from a stream seeded by (seed, the batch's first sample, the sample);
            # the batch's first sample differs from epoch to epoch with the shuffled order.
            first = np.int64(batch_indices[0])
            for dst_ix in my_range(len(batch_indices)):
                np.random.seed(np.uint32((seed * 1_000_003 + first * 7_919
                                          + np.int64(batch_indices[dst_ix])) % 4_294_967_291))
                field = metadata[batch_indices[dst_ix]]
                data = mem_read(field["data_ptr"], storage_state)
                height = np.int64(field["height"])
                width = np.int64(field["width"])
                i, j, h, w = get_crop_c(height, width, scale, ratio)
                if field["mode"] == jpg:
                    if decode_crop(data, height, width, i, j, h, w, pixels[dst_ix],
                                   cut_jpegs[dst_ix], seg_starts[dst_ix], destination[dst_ix],
                                   cut_segments) == 0:
                        mark_failed_c(flags_at, flags_size, np.int64(batch_indices[dst_ix]))
                        destination[dst_ix][:] = 0
                else:
                    image = data.reshape(height, width, 3)
                    resize_crop_c(image, i, i + h, j, j + w, destination[dst_ix])
                if flip and np.random.random() < 0.5:  # horizontal flip, same stream
                    out = destination[dst_ix]
                    out[:] = out[:, ::-1].copy()
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class ScaledRandomResizedCropDecoder(ScaledResizedCropDecoder):
    """Random resized crop (FFCV's and torchvision's distribution), decoded at reduced cost."""

    get_crop = staticmethod(get_random_crop)

    def __init__(self, output_size: tuple[int, int], scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), max_jpeg_bytes: int | None = None,
                 cut_segments: bool = True, seed: int = 0, flip: bool = False) -> None:
        super().__init__(output_size, max_jpeg_bytes, cut_segments, seed, flip)
        self.scale = scale
        self.ratio = ratio
