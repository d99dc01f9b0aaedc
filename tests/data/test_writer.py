import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from qlnas.data import read_classes
from qlnas.data.writer import write_beton
from qlnas.errors import UserError
from tests.data.conftest import make_tree, psnr, stored_images


def test_round_trip_keeps_labels_and_images(photo_tree, photo_beton):
    classes = read_classes(photo_beton)
    assert classes == sorted(p.name for p in photo_tree.iterdir() if p.is_dir())
    sources = [(classes.index(p.parent.name), np.asarray(Image.open(p).convert("RGB")))
               for c in classes for p in sorted((photo_tree / c).glob("*.jpg"))]
    stored = stored_images(photo_beton)
    assert len(stored) == len(sources) == 36
    for (label, img), (src_label, src) in zip(stored, sources, strict=True):
        assert label == src_label
        assert img.shape == src.shape
        assert psnr(img, src) > 30


def test_max_res_keeps_longest_side(photo_tree, tmp_path):
    out = tmp_path / "small.beton"
    write_beton(photo_tree, out, max_res=100, limit_per_class=1, workers=1)
    for _, img in stored_images(out):
        assert max(img.shape[:2]) == 100


def test_subset_and_limit(tmp_path):
    src = make_tree(tmp_path / "src", {"b": 3, "a": 2, "c": 4})
    (tmp_path / "subset.txt").write_text("c\nb\n")
    out = tmp_path / "out.beton"
    result = write_beton(src, out, subset=str(tmp_path / "subset.txt"), limit_per_class=3,
                         workers=1)
    assert result.classes == read_classes(out) == ["b", "c"]
    assert [label for label, _ in stored_images(out)] == [0, 0, 0, 1, 1, 1]


def test_subset_class_missing(tmp_path):
    src = make_tree(tmp_path / "src", {"n01440764": 1})
    with pytest.raises(UserError, match="from --subset is not there"):
        write_beton(src, tmp_path / "out.beton", subset="imagenet100", workers=1)


@pytest.mark.parametrize("setup, message", [
    (lambda root: None, "source folder not found"),
    (lambda root: root.mkdir(), "no class folders"),
    (lambda root: (root / "a").mkdir(parents=True), "no images"),
])
def test_bad_source(tmp_path, setup, message):
    setup(tmp_path / "src")
    with pytest.raises(UserError, match=message):
        write_beton(tmp_path / "src", tmp_path / "out.beton", workers=1)


def test_corrupt_image_stops_or_is_skipped(tmp_path):
    src = make_tree(tmp_path / "src", {"a": 2, "b": 2})
    bad = src / "b" / "000.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    (src / "a" / "zz.png").write_bytes(b"not an image")
    out = tmp_path / "out.beton"
    with pytest.raises(UserError, match=str(src / "a" / "zz.png")):
        write_beton(src, out, workers=1)
    assert not out.exists()
    result = write_beton(src, out, workers=1, skip_corrupt=True)
    assert sorted(result.skipped) == sorted([str(src / "a" / "zz.png"), str(bad)])
    assert [label for label, _ in stored_images(out)] == [0, 0, 1]


def test_float_pixels_are_refused_by_name(tmp_path):
    # A 32-bit float TIFF has no known range to read 8 bits from: refused, not guessed.
    src = make_tree(tmp_path / "src", {"a": 1})
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(src / "a" / "f.tif")
    with pytest.raises(UserError) as err:
        write_beton(src, tmp_path / "out.beton", workers=1)
    assert str(err.value) == (f"{src / 'a' / 'f.tif'}: cannot decode image (F pixels (32-bit "
                              "floats)); use --skip-corrupt to leave such files out")


WRITE = """
import sys
from qlnas.data.writer import write_beton
from qlnas.errors import UserError
try:
    write_beton(sys.argv[1], sys.argv[2], workers=1, max_res=int(sys.argv[3]), quality=100,
                page_size=2 << 20)
except UserError as exc:
    print(f"error: {exc}")
"""


def write_in_a_process(src, out, max_res: int) -> subprocess.CompletedProcess:
    """A write in its own process, so that a hang of FFCV's writer fails the test."""
    return subprocess.run([sys.executable, "-c", WRITE, str(src), str(out), str(max_res)],
                          capture_output=True, text=True, timeout=120)


def test_images_thinner_than_max_res_allows_are_written(tmp_path):
    # FFCV's resizer makes a 1x700 image 0x512 at --max-res 512; OpenCV raised in the writer's
    # worker, which hung the write.
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    Image.fromarray(np.full((1, 700, 3), 200, np.uint8)).save(src / "wide.png")
    Image.fromarray(np.full((700, 2, 3), 100, np.uint8)).save(src / "tall.png")
    out = tmp_path / "out.beton"
    proc = write_in_a_process(tmp_path / "src", out, 512)
    assert proc.returncode == 0 and "error" not in proc.stdout, proc.stderr[-2000:]
    assert sorted(image.shape for _, image in stored_images(out)) == [(1, 512, 3), (512, 1, 3)]


def test_an_image_that_does_not_fit_a_page_stops_the_write_naming_it(tmp_path):
    # A JPEG over FFCV's page (2 MiB here) made its allocator raise in a worker: a hang.
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    noise = np.random.default_rng(0).integers(0, 256, (1200, 1200, 3), dtype=np.uint8)
    Image.fromarray(noise).save(src / "noise.png")
    Image.fromarray(noise[:64, :64]).save(src / "small.png")
    out = tmp_path / "out.beton"
    proc = write_in_a_process(tmp_path / "src", out, 1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == (f"error: {tmp_path / 'src'}: 1 image(s) failed to decode or encode "
                           "while writing (named above; files changed during the write?)\n")
    assert f"{src / 'noise.png'}: cannot encode image" in proc.stderr
    assert "page size is 2097152" in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.beton*"))


def test_raw_samples_larger_than_a_page_are_refused_before_writing(tmp_path):
    src = make_tree(tmp_path / "src", {"a": 1})
    with pytest.raises(UserError) as err:
        write_beton(src, tmp_path / "out.beton", workers=1, max_res=2048, write_mode="raw")
    assert str(err.value) == ("--max-res 2048 with --write-mode raw: a raw image of up to "
                              "12.0 MiB does not fit in FFCV's 8 MiB page; lower --max-res (or "
                              "--smart-threshold) or use --write-mode jpg")
    write_beton(src, tmp_path / "out.beton", workers=1, max_res=1024, write_mode="raw")
    assert not list(tmp_path.glob(".out.beton*"))


@pytest.mark.parametrize("mode,given,message", [
    ("jpg", {"compress_probability": 0.9}, "--compress-probability 0.9: --write-mode jpg does "
     "not use it (it goes with --write-mode proportion)"),
    ("proportion", {"smart_threshold": 100}, "--smart-threshold 100: --write-mode proportion "
     "does not use it (it goes with --write-mode smart)"),
    ("raw", {"quality": 50}, "--quality 50: --write-mode raw does not use it"),
    ("smart", {"smart_threshold": -1}, "--smart-threshold -1: expected bytes >= 0"),
])
def test_a_setting_the_write_mode_does_not_read_is_refused(tmp_path, mode, given, message):
    src = make_tree(tmp_path / "src", {"a": 1})
    with pytest.raises(UserError, match=re.escape(message)):
        write_beton(src, tmp_path / "out.beton", workers=1, write_mode=mode, **given)
    assert not list(tmp_path.glob("*out.beton*"))


def test_smart_threshold_zero_stores_every_image_as_jpeg(tmp_path):
    # 0 read as "unset" and fell back to the default threshold: small images were stored raw.
    from ffcv.reader import Reader

    src = make_tree(tmp_path / "src", {"a": 3}, size=(16, 16))  # 768 raw bytes each
    out = tmp_path / "out.beton"
    write_beton(src, out, workers=1, max_res=64, write_mode="smart", smart_threshold=0)
    metadata = Reader(str(out)).metadata
    assert (metadata["f0"]["mode"] == 0).all()  # 0: JPEG in FFCV's RGBImageField


def test_a_class_list_from_another_write_is_refused(tmp_path):
    # An --overwrite killed between the two renames: the new class list, the old file.
    out = tmp_path / "out.beton"
    write_beton(make_tree(tmp_path / "old", {"a": 2, "b": 2}), out, workers=1)
    other = tmp_path / "other.beton"
    write_beton(make_tree(tmp_path / "new", {"c": 3}), other, workers=1)
    assert read_classes(out) == ["a", "b"]
    shutil.copy(f"{other}.classes.json", f"{out}.classes.json")
    with pytest.raises(UserError, match=re.escape(
            f"{out}.classes.json: written for another out.beton than the one beside it")):
        read_classes(out)
    # One of the same size, same classes and sample count: its allocation table tells it.
    write_beton(make_tree(tmp_path / "same", {"a": 2, "b": 2}, seed=1), other, workers=1,
                overwrite=True)
    assert other.stat().st_size == out.stat().st_size
    shutil.copy(f"{other}.classes.json", f"{out}.classes.json")
    with pytest.raises(UserError, match="written for another out.beton"):
        read_classes(out)


def test_refuses_to_overwrite(tmp_path):
    src = make_tree(tmp_path / "src", {"a": 1})
    out = tmp_path / "out.beton"
    out.write_text("keep me")
    with pytest.raises(UserError, match="already exists"):
        write_beton(src, out, workers=1)
    assert out.read_text() == "keep me"
    write_beton(src, out, workers=1, overwrite=True)
    assert len(stored_images(out)) == 1


def test_cli_errors_are_one_line(tmp_path, capsys):
    from qlnas.cli import main

    assert main(["data", "write", str(tmp_path / "nope"), str(tmp_path / "o.beton")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope" in err


def test_cli_write_and_info(photo_tree, tmp_path, capsys):
    from qlnas.cli import main

    out = tmp_path / "o.beton"
    assert main(["data", "write", str(photo_tree), str(out), "--limit-per-class", "2",
                 "--workers", "1", "--max-res", "256"]) == 0
    assert main(["data", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "samples:  " in text and "width:" in text and "max 256" in text
    # a file this small is read through the page cache; its pages are the writer's 8 MiB
    assert "reading:  cached on this node under data_mode auto (" in text
    assert text.rstrip().endswith("; pages of 8 MiB)")


@pytest.mark.slow
def test_interrupted_write_leaves_nothing(photo_tree, tmp_path):
    out = tmp_path / "out.beton"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qlnas.cli", "data", "write", str(photo_tree), str(out),
         "--workers", "1", "--write-mode", "raw"],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.beton.*")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the write ended before it could be interrupted"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
