"""The validation crop is timm's: `timm.data.create_transform(..., is_training=False)`."""

import io

import numpy as np
import pytest
import timm
import timm.data
import torch
from ffcv.libffcv import imdecode
from numba import njit
from PIL import Image

from qlnas.data import build_val_loader
from qlnas.data.center_crop import center_box, resample_box
from qlnas.data.loaders import IMAGENET_MEAN, IMAGENET_STD, val_crop_pct
from qlnas.errors import UserError
from tests.data.conftest import jpegs_of

# FFCV's full-size decode in a dispatcher of this module's own: when this test called
# qlnas.data.decoders.imdecode_nb from Python, later tests' kernels calling it failed in numba
# (KeyError in its overloads) once the loaders here were freed.
ffcv_decode = njit(nogil=True)(imdecode)


def timm_eval(img: Image.Image, res: int, crop_pct: float) -> np.ndarray:
    """timm's eval transform up to (not including) ToTensor and Normalize: HxWx3 uint8."""
    tf = timm.data.create_transform(input_size=res, crop_pct=crop_pct, is_training=False,
                                    normalize=False)
    return tf(img).numpy().transpose(1, 2, 0)


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (333, 333), (64, 40), (1000, 751)])
@pytest.mark.parametrize("res, crop_pct", [(224, 0.875), (160, 0.95), (37, 0.9), (32, 1.0)])
def test_same_pixels_give_timms_pixels_exactly(size, res, crop_pct):
    """Geometry (torchvision's truncation and rounding) and filter (PIL's fixed point): on the
    same decoded pixels, every output pixel equals timm's."""
    from skimage import data

    img = Image.fromarray(data.astronaut()).resize(size, Image.Resampling.BICUBIC)
    box = np.zeros(4)
    center_box(size[1], size[0], res, crop_pct, box)
    ours = np.zeros((res, res, 3), np.uint8)
    resample_box(np.asarray(img), *box, ours)
    np.testing.assert_array_equal(ours, timm_eval(img, res, crop_pct))


def pixels(images: torch.Tensor) -> np.ndarray:
    """The loader's normalised NCHW floats back on the 0-255 scale, NHWC."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images * std + mean).permute(0, 2, 3, 1).numpy().astype(np.float64)


@pytest.mark.parametrize("res, crop_pct", [(224, 0.875), (160, 0.95), (64, 1.0)])
def test_val_loader_matches_timm_within_decoder_noise(photo_beton, res, crop_pct):
    """Mean absolute difference on 0-255 pixels (ours un-normalised, timm's before ToTensor)
    against timm's transform on PIL's decode of the very JPEG bytes in the file.

    Tolerance: the two JPEG decoders alone (FFCV's TurboJPEG call vs PIL's libjpeg, full size)
    differ by ~0.7 per pixel on these photos (`floor`, measured below); our pipeline may add
    0.3 on average (DCT-scaled decoding at 1/2 and 1/4 for 160 and 64 px) and no image may
    differ by more than 1.6. FFCV's stock centre crop is 2.6-5.6 on average here."""
    jpegs = jpegs_of(photo_beton, 36)
    floor = []
    for data, h, w in jpegs[:12]:
        full = np.empty(3 * h * w, np.uint8)
        assert ffcv_decode(data, full, h, w, h, w, 0, 0, 1, 1, False, False) == 0
        pil = np.asarray(Image.open(io.BytesIO(data.tobytes())).convert("RGB"))
        floor.append(np.abs(full.reshape(h, w, 3).astype(np.float64) - pil).mean())
    floor = float(np.mean(floor))
    assert 0.0 < floor < 1.0  # the decoders do differ, by rounding only
    loader = build_val_loader(photo_beton, batch_size=12, resolution=res, crop_pct=crop_pct,
                              num_workers=1)
    ours = np.concatenate([pixels(x) for x, _ in loader])
    errors = [np.abs(ours[k] - timm_eval(Image.open(io.BytesIO(data.tobytes())).convert("RGB"),
                                          res, crop_pct)).mean()
              for k, (data, _, _) in enumerate(jpegs)]
    assert len(ours) == 36
    assert np.mean(errors) < floor + 0.3, (floor, errors)
    assert max(errors) < 1.6, errors


def test_crop_pct_of_a_model():
    assert val_crop_pct(timm.create_model("qlnet26n", num_classes=10)) == 0.875
    model = timm.create_model("qlnet26n", num_classes=10,
                              pretrained_cfg_overlay=dict(crop_pct=0.95))
    assert val_crop_pct(model) == 0.95
    assert val_crop_pct(torch.nn.Linear(2, 2)) == 0.875  # not a timm model: timm's default


def test_stock_decoder_and_bad_crop_pct(demo_betons):
    stock = build_val_loader(demo_betons[1], batch_size=64, resolution=24, decoder="stock")
    images = torch.cat([x for x, _ in stock])
    assert images.shape == (360, 3, 24, 24)
    ours = torch.cat([x for x, _ in build_val_loader(demo_betons[1], batch_size=64,
                                                      resolution=24)])
    same = torch.corrcoef(torch.stack([ours.flatten(), images.flatten()]))[0, 1]
    assert 0.95 < same < 1  # the same crops, another filter
    for bad in (0.0, 1.2):
        with pytest.raises(UserError, match=f"crop_pct={bad}: expected 0 < crop_pct <= 1"):
            build_val_loader(demo_betons[1], batch_size=8, resolution=24, crop_pct=bad)
