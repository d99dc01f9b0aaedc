"""A flat folder with a label file (ImageNet's val layout), written to real `.beton` files."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from qlnas.cli import main
from qlnas.data import read_classes
from qlnas.data.labels import read_labels
from qlnas.data.writer import write_beton
from qlnas.errors import UserError
from tests.data.conftest import psnr, stored_images


@pytest.fixture(scope="module")
def flat_val(photo_tree, tmp_path_factory):
    """photo_tree's 36 JPEGs in one folder under ImageNet val names, in shuffled order:
    (folder, {file name: class}); the classes are photo_tree's folder names."""
    folder = tmp_path_factory.mktemp("flat") / "val"
    folder.mkdir()
    files = sorted(photo_tree.glob("*/*.jpg"))
    order = np.random.default_rng(0).permutation(len(files))
    truth = {}
    for k, src in zip(order, files, strict=True):
        name = f"ILSVRC2012_val_{k + 1:08d}.JPEG"
        shutil.copyfile(src, folder / name)
        truth[name] = src.parent.name
    return folder, truth


def loc_csv(path, truth, extra=()):
    """Kaggle's LOC_val_solution.csv: ids without extension, 'wnid x1 y1 x2 y2 ' groups; a
    second group of another class on some rows (the first one is the label)."""
    names = sorted(truth.values())
    rows = ["ImageId,PredictionString"]
    for n, (name, wnid) in enumerate(sorted(truth.items(), reverse=True)):
        groups = f"{wnid} {n} 20 {n + 100} 260 "
        if n % 3 == 0:
            groups += f"{names[(names.index(wnid) + 1) % len(names)]} 1 2 30 40 "
        rows.append(f"{name.rsplit('.', 1)[0]},{groups}")
    path.write_text("\n".join([*rows, *extra]) + "\n")
    return path


def plain_list(path, truth, extra=()):
    lines = ["# filename wnid", *(f"{name} {wnid}" for name, wnid in truth.items()), ""]
    path.write_text("\n".join([*lines, *extra]) + "\n")
    return path


def check_samples(out, folder, truth):
    """Every sample is one of the source images, each once, with that image's class."""
    classes = read_classes(out)
    names = sorted(truth)
    thumbs = np.stack([np.asarray(Image.open(folder / n).convert("RGB"))[::8, ::8]
                       for n in names]).astype(np.float64)
    seen = []
    for label, img in stored_images(out):
        error = np.abs(thumbs - img[::8, ::8]).mean(axis=(1, 2, 3))
        name = names[int(error.argmin())]
        assert psnr(img, np.asarray(Image.open(folder / name).convert("RGB"))) > 30, name
        assert classes[label] == truth[name], name
        seen.append(name)
    assert sorted(seen) == names


def test_loc_val_solution_round_trips(flat_val, photo_beton, tmp_path):
    folder, truth = flat_val
    labels = loc_csv(tmp_path / "LOC_val_solution.csv", truth)
    out = tmp_path / "val.beton"
    result = write_beton(folder, out, labels=labels, workers=2)
    assert result.num_samples == 36
    check_samples(out, folder, truth)
    # the class-folder path orders the same classes the same way: train and val labels agree
    assert read_classes(out) == read_classes(photo_beton)


def test_plain_list_with_subset_and_known_classes(flat_val, photo_beton, tmp_path):
    folder, truth = flat_val
    classes = read_classes(photo_beton)
    kept = classes[1:4]
    (tmp_path / "subset.txt").write_text("\n".join(reversed(kept)) + "\n")
    out = tmp_path / "val.beton"
    write_beton(folder, out, labels=plain_list(tmp_path / "val.txt", truth),
                subset=str(tmp_path / "subset.txt"), workers=1)
    assert read_classes(out) == kept
    check_samples(out, folder, {n: c for n, c in truth.items() if c in kept})
    # a val folder that lacks classes keeps the train file's indices with --classes
    few = {n: c for n, c in truth.items() if c in kept}
    part = tmp_path / "part"
    part.mkdir()
    for name in few:
        shutil.copyfile(folder / name, part / name)
    out = tmp_path / "part.beton"
    write_beton(part, out, labels=plain_list(tmp_path / "few.txt", few), workers=1,
                known_classes=photo_beton)
    assert read_classes(out) == classes
    check_samples(out, part, few)


def test_readme_command_subset_val_against_a_subset_train(flat_val, photo_tree, tmp_path):
    # The README's ImageNet-100 val: labels for every class, --subset and the train file's
    # classes; the labels of classes outside the subset are dropped, not refused.
    folder, truth = flat_val
    (tmp_path / "subset.txt").write_text("\n".join(sorted(set(truth.values()))[1:4]) + "\n")
    subset = str(tmp_path / "subset.txt")
    train = tmp_path / "train.beton"
    write_beton(photo_tree, train, subset=subset, workers=1)
    out = tmp_path / "val.beton"
    write_beton(folder, out, labels=loc_csv(tmp_path / "LOC_val_solution.csv", truth),
                subset=subset, known_classes=train, workers=1)
    assert read_classes(out) == read_classes(train)
    check_samples(out, folder, {n: c for n, c in truth.items() if c in read_classes(train)})


def test_format_is_told_from_content(flat_val, tmp_path):
    folder, truth = flat_val
    name = next(iter(truth))  # line 2 of the plain list; loc_csv has them in reverse order
    stem = name.rsplit(".", 1)[0]
    loc = read_labels(loc_csv(tmp_path / "labels.txt", truth))
    assert loc[stem] == (truth[name], 2 + sorted(truth, reverse=True).index(name))
    assert read_labels(plain_list(tmp_path / "labels.csv", truth))[name] == (truth[name], 2)


def edit_line(path, number, text):
    """Line `number` replaced by `text` (None: removed)."""
    lines = path.read_text().splitlines()
    lines[number - 1:number] = [] if text is None else [text]
    path.write_text("\n".join(lines) + "\n")
    return path


# case: (label file from (path, truth), extra flags, the expected error after 'qlnas: error: ')
BAD = {
    "missing image": (
        lambda p, t: loc_csv(p, t, ["ILSVRC2012_val_99999999,n01440764 1 2 3 4 "]), [],
        "{labels} line 38: image 'ILSVRC2012_val_99999999' is not in {src}"),
    "image without a label": (
        lambda p, t: edit_line(loc_csv(p, t), 2, None), [],
        "{src}/{last}: no label in {labels}"),  # loc_csv's row 2 is the last name
    "unknown class": (
        lambda p, t: edit_line(plain_list(p, t), 2, f"{next(iter(t))} n99999999"),
        ["--classes", "{train}"],
        "{labels} line 2: class 'n99999999' of '{first}' is not one of the 12 known classes "
        "(--classes)"),
    "unparseable csv row": (
        lambda p, t: loc_csv(p, t, ["ILSVRC2012_val_00000001,n01440764 1 2"]), [],
        "{labels} line 38: expected 'ImageId,wnid x1 y1 x2 y2 ...', "
        "got 'ILSVRC2012_val_00000001,n01440764 1 2'"),
    "unparseable list line": (
        lambda p, t: plain_list(p, t, ["a.JPEG b c"]), [],
        "{labels} line 39: expected 'filename wnid' (or the LOC_val_solution.csv header "
        "ImageId,PredictionString), got 'a.JPEG b c'"),
    "labelled twice": (
        lambda p, t: plain_list(p, t, [f"{next(iter(t))} astronaut"]), [],
        "{labels} line 39: '{first}' is labelled again (first at line 2)"),
    "subset class without images": (
        loc_csv, ["--subset", "{subset}"],
        "{labels}: class 'n99999999' from --subset is not there"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_labels_are_one_line_and_leave_nothing(flat_val, photo_beton, tmp_path, capsys,
                                                    case):
    folder, truth = flat_val
    make, flags, message = BAD[case]
    labels = make(tmp_path / "labels", truth)
    (tmp_path / "subset.txt").write_text("astronaut\nn99999999\n")
    fill = dict(labels=labels, src=folder, train=photo_beton, subset=tmp_path / "subset.txt",
                first=next(iter(truth)), last=max(truth))
    out = tmp_path / "out" / "val.beton"
    argv = ["data", "write", str(folder), str(out), "--labels", str(labels),
            *(f.format(**fill) for f in flags)]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"qlnas: error: {message.format(**fill)}\n"
    assert not out.parent.exists()  # nothing written, not even the folder


def test_labels_without_flat_images(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "l.txt").write_text("x.JPEG a\n")
    with pytest.raises(UserError, match="no images"):
        write_beton(tmp_path / "src", tmp_path / "o.beton", labels=tmp_path / "l.txt")
    with pytest.raises(UserError, match="--classes goes with --labels"):
        write_beton(tmp_path / "src", tmp_path / "o.beton", known_classes=tmp_path / "l.txt")


@pytest.mark.slow
def test_cli_entry_point_exits_2_with_one_line(flat_val, tmp_path):
    folder, truth = flat_val
    labels = loc_csv(tmp_path / "LOC_val_solution.csv", truth, ["nope,n01440764 1 2 3 4"])
    out = tmp_path / "out" / "val.beton"
    proc = subprocess.run([sys.executable, "-m", "qlnas.cli", "data", "write", str(folder),
                           str(out), "--labels", str(labels)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr == f"qlnas: error: {labels} line 38: image 'nope' is not in {folder}\n"
    assert not out.parent.exists()
