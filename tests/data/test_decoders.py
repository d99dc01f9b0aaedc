import io

import numpy as np
import pytest
from ffcv.fields.rgb_image import get_random_crop
from PIL import Image

from qlnas.data.decoders import (
    coarsest_scale,
    cut_region,
    decode_crop,
    decode_full,
    imdecode_nb,
    parse_jpeg,
)
from tests.data.conftest import jpegs_of, psnr


def buffers(res, h=375, w=500):
    return (np.empty(3 * h * w, np.uint8), np.empty(400_000, np.uint8),
            np.empty(2048, np.int64), np.empty((res, res, 3), np.uint8))


def test_coarsest_scale():
    assert coarsest_scale(375, 500, 160, 160) == 2
    assert coarsest_scale(319, 500, 160, 160) == 1
    assert coarsest_scale(375, 500, 32, 32) == 8
    assert coarsest_scale(100, 100, 160, 160) == 1


@pytest.mark.parametrize("res", [64, 160])
def test_scaled_crops_match_the_full_scale_reference(photo_beton, res):
    np.random.seed(0)
    pixels, cut, starts, ours = buffers(res)
    ref = np.empty_like(ours)
    scores, scales = [], set()
    for data, h, w in jpegs_of(photo_beton, 36):
        for _ in range(4):
            i, j, ch, cw = get_random_crop(h, w, np.array((0.08, 1.0)), np.array((0.75, 4 / 3)))
            scales.add(decode_crop(data, h, w, i, j, ch, cw, pixels, cut, starts, ours, True))
            decode_full(data, h, w, i, j, ch, cw, pixels, ref)
            scores.append(psnr(ours, ref))
    assert scales >= {1, 2}
    assert min(scores) > 25 and np.mean(scores) > 32


def test_cut_region_is_a_jpeg_of_exactly_that_region(photo_beton):
    data, h, w = jpegs_of(photo_beton, 1)[0]
    pixels, cut, starts, _ = buffers(8)
    info, region = np.zeros(7, np.int64), np.zeros(4, np.int64)
    assert parse_jpeg(data, info)
    size = cut_region(data, info, starts, cut, 100, 130, 150, 200, region)
    y0, x0, rh, rw = (int(v) for v in region)
    assert y0 <= 100 and x0 <= 130 and y0 + rh >= 250 and x0 + rw >= 330
    assert rh * rw < h * w and y0 % 16 == 0 and x0 % 16 == 0
    part = np.asarray(Image.open(io.BytesIO(cut[:size].tobytes())).convert("RGB"))
    assert part.shape == (rh, rw, 3)
    full = np.empty(3 * h * w, np.uint8)
    assert imdecode_nb(data, full, h, w, h, w, 0, 0, 1, 1, False, False) == 0
    full = full.reshape(h, w, 3)[y0:y0 + rh, x0:x0 + rw]
    assert psnr(part[2:-2, 2:-2], full[2:-2, 2:-2]) > 40


def test_jpegs_without_restart_markers_fall_back_to_scaled_decoding():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((300, 200))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    data = np.frombuffer(buf.getvalue(), np.uint8).copy()
    assert not parse_jpeg(data, np.zeros(7, np.int64))
    pixels, cut, starts, ours = buffers(48, 200, 300)
    ref = np.empty_like(ours)
    assert decode_crop(data, 200, 300, 10, 20, 180, 250, pixels, cut, starts, ours, True) == 2
    decode_full(data, 200, 300, 10, 20, 180, 250, pixels, ref)
    assert psnr(ours, ref) > 30
