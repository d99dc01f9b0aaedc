"""The generated JPEG tree the loader and writer benchmarks read."""

from PIL import Image

from qlnas.bench.photos import make_jpegs


def test_tree_of_jpegs_one_class_per_photo_reused_when_complete(tmp_path):
    root = make_jpegs(tmp_path, count=6, size=(64, 48), grain=2.0)
    files = sorted(root.rglob("*.jpg"))
    assert len(files) == 6 and len({f.parent.name for f in files}) == 6
    assert all(Image.open(f).size == (64, 48) for f in files)
    stamp = {f: f.stat().st_mtime_ns for f in files}
    files[0].unlink()  # a complete tree is not written again
    assert make_jpegs(tmp_path, count=6, size=(64, 48), grain=2.0) == root
    assert not files[0].exists() and all(f.stat().st_mtime_ns == stamp[f] for f in files[1:])
