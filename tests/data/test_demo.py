import time

import numpy as np
import pytest
from ffcv.reader import Reader

from qlnas.data import demo_dataset, read_classes
from qlnas.data.demo import digits_split
from qlnas.errors import UserError


def test_demo_dataset_has_ten_classes_and_the_split_counts(demo_betons):
    train, val = demo_betons
    assert read_classes(train) == read_classes(val) == [str(d) for d in range(10)]
    split = digits_split()
    for path, name, total in ((train, "train", 1437), (val, "val", 360)):
        labels = Reader(str(path)).metadata["f1"]
        assert len(labels) == total
        assert np.array_equal(np.bincount(labels, minlength=10),
                              np.bincount(split[name][1], minlength=10))


def test_demo_split_is_stratified_and_deterministic():
    a, b = digits_split(), digits_split()
    assert np.array_equal(a["val"][1], b["val"][1])
    counts = np.bincount(a["val"][1])
    assert counts.min() >= 35 and counts.max() <= 37
    assert a["train"][0].shape[1:] == (32, 32, 3)


def test_second_call_is_instant_and_cached_by_env(demo_betons, monkeypatch):
    root = demo_betons[0].parent
    start = time.perf_counter()
    assert demo_dataset(root) == demo_betons
    assert time.perf_counter() - start < 0.5
    monkeypatch.setenv("QLNAS_CACHE", str(root.parent / "cache"))
    (root.parent / "cache").mkdir()
    (root.parent / "cache" / "digits-v1").symlink_to(root)
    assert demo_dataset() == (root.parent / "cache" / "digits-v1" / "train.beton",
                              root.parent / "cache" / "digits-v1" / "val.beton")


def test_read_classes_missing(tmp_path):
    with pytest.raises(UserError, match="class list not found"):
        read_classes(tmp_path / "x.beton")
