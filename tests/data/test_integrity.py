"""A damaged `.beton` (header, middle, end, truncated) is one clear error or a named list of bad
samples, never a traceback from FFCV's reader or garbage; `data info --verify` finds them."""

import os

import numpy as np
import pytest

from qlnas.cli import main
from qlnas.data import build_train_loader, build_val_loader
from qlnas.data.integrity import CorruptSamples, DamagedFile, open_beton, verify
from tests.data.damage import damaged_copy, samples_in


@pytest.mark.parametrize("where", ["header", "end", "truncated"])
def test_a_damaged_structure_is_one_error_naming_the_file(demo_betons, tmp_path, where):
    bad = damaged_copy(demo_betons[0], tmp_path / "train.beton", where)
    with pytest.raises(DamagedFile) as err:
        open_beton(bad)
    message = str(err.value)
    assert message.startswith(f"{bad}: damaged or not an FFCV file") and "\n" not in message
    with pytest.raises(DamagedFile):
        build_train_loader(bad, batch_size=8, resolution=32)


def test_verify_finds_the_samples_under_a_damaged_middle(demo_betons, tmp_path):
    src = demo_betons[0]
    bad = damaged_copy(src, tmp_path / "train.beton", "middle")
    size = os.path.getsize(src)
    wholly, partly = samples_in(src, size // 3, 2 * size // 3)
    assert len(wholly) > 100
    found = set(verify(bad, workers=2, progress=False)["image"])
    # Every sample whose bytes were all overwritten fails; none outside the damage does (one
    # only grazed by it may still decode).
    assert wholly <= found <= partly
    assert verify(src, workers=2, progress=False) == {"image": []}


def test_data_info_verify_lists_the_bad_samples(demo_betons, tmp_path, capsys):
    bad = damaged_copy(demo_betons[0], tmp_path / "train.beton", "middle")
    assert main(["data", "info", str(bad), "--verify"]) == 1
    out = capsys.readouterr().out
    found = verify(bad, progress=False)["image"]
    assert f"image: {len(found)} sample(s) fail to decode" in out
    listed = [int(line.split()[1]) for line in out.splitlines() if line.startswith("  sample ")]
    assert listed == found
    assert main(["data", "info", str(demo_betons[1]), "--verify"]) == 0
    assert main(["data", "info", str(tmp_path / "none.beton"), "--verify"]) == 2


def batches_of(loader):
    return [(images.clone(), labels.clone()) for images, labels in loader]


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_corrupt_sample_stops_the_loader_or_is_left_out(demo_betons, tmp_path, split):
    """Without skip_corrupt the first damaged batch raises, naming its samples; with it, the
    damaged samples are missing from their batches (the others as in the clean file, for val)
    and counted."""
    src = demo_betons[0]
    bad = damaged_copy(src, tmp_path / "train.beton", "middle")
    found = set(verify(bad, progress=False)["image"])
    build = build_train_loader if split == "train" else build_val_loader
    loader = build(bad, batch_size=64, resolution=32, num_workers=2)
    with pytest.raises(CorruptSamples, match=r"sample \d+ \(class '\d'\).* failed to decode"):
        batches_of(loader)
    skipping = build(bad, batch_size=64, resolution=32, num_workers=2, skip_corrupt=True)
    kept = batches_of(skipping)
    read = set(skipping._loader.traversal_order.sample_order(0)[:len(skipping) * 64].tolist())
    assert skipping.skipped == found & read and skipping.skipped
    assert sum(len(labels) for _, labels in kept) == len(read) - len(skipping.skipped)
    if split == "val":  # file order: the clean file's batches, less the damaged rows
        clean = batches_of(build(src, batch_size=64, resolution=32, num_workers=2))
        images = np.concatenate([i.numpy() for i, _ in clean])
        keep = np.array(sorted(set(range(len(images))) - found))
        assert np.array_equal(np.concatenate([i.numpy() for i, _ in kept]), images[keep])
