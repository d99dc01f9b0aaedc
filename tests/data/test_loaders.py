import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from ffcv.reader import Reader

from qlnas.data import build_train_loader, build_val_loader, resolution_for_epoch
from qlnas.data.loaders import IMAGENET_MEAN, IMAGENET_STD
from qlnas.data.order import PagedOrder, sample_pages, stream_window
from qlnas.errors import UserError


def labels_of(loader):
    return torch.cat([y for _, y in loader]).tolist()


@pytest.fixture(scope="module")
def train_loader(demo_betons):
    return build_train_loader(demo_betons[0], batch_size=100, resolution=32, num_workers=2)


def test_train_batches(train_loader):
    assert len(train_loader) == 1437 // 100
    images, labels = next(iter(train_loader))
    assert images.shape == (100, 3, 32, 32) and images.dtype == torch.float32
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert labels.shape == (100,) and labels.dtype == torch.int64
    # normalised: the digits' black background maps to -mean/std
    low = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)])
    assert torch.allclose(images.amin(dim=(0, 2, 3)), low, atol=0.05)


def test_set_epoch_reproduces_the_order(train_loader, demo_betons):
    train_loader.set_epoch(3)
    first = labels_of(train_loader)
    second = labels_of(train_loader)  # epoch 4
    train_loader.set_epoch(3)
    assert labels_of(train_loader) == first != second
    other = build_train_loader(demo_betons[0], batch_size=100, resolution=32, seed=0)
    other.set_epoch(3)
    assert [y.tolist() for _, y in other][:2] == [first[:100], first[100:200]]
    assert len(first) == 1400 and set(first) == set(range(10))


def test_augmentations_are_reproducible(demo_betons):
    """Same seed and epoch: the same crops and flips, whichever thread decodes a sample."""
    def epoch_images(workers, epoch, seed=0):
        loader = build_train_loader(demo_betons[0], batch_size=100, resolution=32, seed=seed,
                                    num_workers=workers)
        loader.set_epoch(epoch)
        return torch.cat([x.clone() for x, _ in loader])

    first = epoch_images(1, 0)
    assert torch.equal(first, epoch_images(2, 0))
    assert not torch.equal(first, epoch_images(2, 1))
    assert not torch.equal(first, epoch_images(2, 0, seed=1))


def test_set_resolution(train_loader):
    train_loader.set_resolution(48)
    images, _ = next(iter(train_loader))
    assert images.shape == (100, 3, 48, 48)
    train_loader.set_resolution(32)


def test_stock_decoder_is_selectable(demo_betons):
    loader = build_train_loader(demo_betons[0], batch_size=64, resolution=24, decoder="stock")
    images, labels = next(iter(loader))
    assert images.shape == (64, 3, 24, 24) and labels.shape == (64,)
    with pytest.raises(UserError, match="decoder"):
        build_train_loader(demo_betons[0], batch_size=8, resolution=24, decoder="nope")


def test_val_reads_every_sample_in_order(demo_betons):
    loader = build_val_loader(demo_betons[1], batch_size=64, resolution=32)
    assert len(loader) == 6
    assert labels_of(loader) == Reader(str(demo_betons[1])).metadata["f1"].tolist()
    with pytest.raises(TypeError):
        loader.set_resolution(64)


@pytest.mark.parametrize("mode", ["cached", "streamed"])
def test_a_last_batch_of_one_sample(demo_betons, mode):
    # The paper recipe on 8 ranks (24 a rank, 625 val samples each) ends every rank's val
    # epoch with one sample; its label batch must stay 1-D (it used to squeeze to 0-d).
    n = Reader(str(demo_betons[1])).num_samples
    loader = build_val_loader(demo_betons[1], batch_size=n - 1, resolution=16, mode=mode)
    batches = [(tuple(x.shape), tuple(y.shape)) for x, y in loader]
    assert batches == [((n - 1, 3, 16, 16), (n - 1,)), ((1, 3, 16, 16), (1,))]
    assert labels_of(loader) == Reader(str(demo_betons[1])).metadata["f1"].tolist()


def test_streamed_train_reads_its_paged_order(demo_betons):
    """Streamed: FFCV's per-process page cache, fed the paged order of (seed, epoch)."""
    loader = build_train_loader(demo_betons[0], batch_size=100, resolution=32, seed=4,
                                mode="streamed")
    assert loader.mode == "streamed"
    assert build_train_loader(demo_betons[0], batch_size=100, resolution=32).mode == "cached"
    reader = Reader(str(demo_betons[0]))
    expected = PagedOrder(sample_pages(reader), shuffle=True, seed=4, rank=0, world=1,
                          equal_shares=True, window=stream_window(100, reader.page_size))
    stored = reader.metadata["f1"]
    for epoch in (2, 3):
        loader.set_epoch(epoch)
        order = expected.sample_order(epoch).astype(np.int64)[:1400]
        assert labels_of(loader) == stored[order].tolist()


def test_streamed_val_gives_the_cached_pixels(demo_betons):
    def epoch(mode):
        loader = build_val_loader(demo_betons[1], batch_size=64, resolution=32, mode=mode)
        return loader.mode, [(x.clone(), y) for x, y in loader]

    (cached_mode, cached), (streamed_mode, streamed) = epoch("cached"), epoch("streamed")
    assert (cached_mode, streamed_mode) == ("cached", "streamed")
    assert len(cached) == len(streamed) == 6
    for (a, la), (b, lb) in zip(cached, streamed, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        build_val_loader(tmp_path / "x.beton", batch_size=8, resolution=32)


def test_resolution_for_epoch():
    ramp = dict(min_res=160, max_res=192, end_ramp=13, start_ramp=11)
    assert [resolution_for_epoch(e, **ramp) for e in (0, 11, 12, 13, 20)] == [160, 160, 192,
                                                                               192, 192]
    assert resolution_for_epoch(5, min_res=128, max_res=256, end_ramp=10) == 192
    # sizes off the multiples of 32: the rounding stays within the ramp's ends
    odd = [resolution_for_epoch(e, min_res=160, max_res=216, end_ramp=40) for e in range(41)]
    assert min(odd) == 160 and max(odd) == 216 and odd == sorted(odd)
    low = [resolution_for_epoch(e, min_res=100, max_res=224, end_ramp=40) for e in range(41)]
    assert min(low) == 100 and max(low) == 224


def test_more_workers_than_cores_are_clamped_with_one_warning(demo_betons, caplog):
    """A recipe from a bigger machine (workers=8 on 2 cores) runs, with one warning line."""
    caplog.set_level(logging.WARNING, logger="qlnas.data.loaders")
    train = build_train_loader(demo_betons[0], batch_size=64, resolution=24, num_workers=1000)
    val = build_val_loader(demo_betons[1], batch_size=64, resolution=24, num_workers=1000)
    images, labels = next(iter(train))
    assert images.shape == (64, 3, 24, 24) and labels.shape == (64,)
    assert next(iter(val))[0].shape == (64, 3, 24, 24)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and warned[0].startswith("workers=1000 is more than"), warned


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_workers=0), "workers=0: expected at least 1"),
    (dict(batch_size=0), "batch_size=0: expected at least 1"),
    (dict(mode="ram"), "data_mode='ram': expected one of auto, cached, streamed"),
])
def test_settings_the_loader_cannot_honour(demo_betons, kwargs, match):
    with pytest.raises(UserError, match=match):
        build_val_loader(demo_betons[1], **{"batch_size": 8, "resolution": 24, **kwargs})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(demo_betons):
    with pytest.raises(UserError, match="CUDA is not available"):
        build_val_loader(demo_betons[1], batch_size=8, resolution=24, device="cuda")


@pytest.mark.slow
def test_train_with_more_workers_than_cores(tmp_path):
    cmd = [sys.executable, "-m", "qlnas.cli", "train", "--workers", "64", "--epochs", "1",
           "--warmup-epochs", "0", "--max-steps-per-epoch", "2", "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "workers=64 is more than" in proc.stderr
    assert (tmp_path / "run" / "model.pt").is_file()
