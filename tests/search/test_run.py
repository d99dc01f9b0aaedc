"""A search stores its space; `--resume` with another space is refused with one line."""

import json
import subprocess
import sys

import pytest

from qlnas.errors import UserError
from qlnas.search.run import resumed_space, store_space
from qlnas.search.space import load_space
from tests.search.test_search import SPACE


def stored_search(tmp_path, **kw):
    """A search folder as a search leaves it (its space stored, Tune's folder there)."""
    space = tmp_path / "space.yaml"
    space.write_text(SPACE.format(**{"epochs": 2, "forms": "[eq3, glb]", "lrs": "[0.2]",
                                     "trials": 2, **kw}))
    out = tmp_path / "out"
    (out / "tune").mkdir(parents=True)
    store_space(load_space(space), out)
    return space, out


def resume(space, out):
    args = ["--space", str(space)] if space is not None else []
    return subprocess.run([sys.executable, "-m", "qlnas.cli", "search", *args, "--out",
                           str(out), "--resume"], capture_output=True, text=True, timeout=120)


def test_the_search_keeps_its_space(tmp_path):
    space, out = stored_search(tmp_path)
    assert (out / "space.yaml").read_text() == space.read_text()
    stored = json.loads((out / "space.json").read_text())
    assert stored["num_trials"] == 2 and stored["params"]["lr"]["choices"] == [0.2]
    assert len(stored["sha256"]) == 64


def test_resume_with_another_space_is_refused(tmp_path):
    space, out = stored_search(tmp_path)
    before = (out / "space.json").read_text()
    other = tmp_path / "other.yaml"
    other.write_text(space.read_text().replace("epochs: 2", "epochs: 3"))
    proc = resume(other, out)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"qlnas: error: --resume: {other} is not the space of the search in {out} "
        f"({out / 'space.yaml'}): fixed.epochs is 3 here but 2 in the search; only "
        "search.num_trials may change"]
    other.write_text(space.read_text().replace("lr: [0.2]", "lr: [0.2, 0.3]"))
    proc = resume(other, out)
    assert proc.returncode == 2 and "params.lr.choices" in proc.stderr, proc.stderr[-3000:]
    other.write_text(space.read_text().replace("num_trials: 2", "num_trials: 1"))
    proc = resume(other, out)
    assert proc.returncode == 2 and "search.num_trials 1 is below the search's 2" \
        in proc.stderr, proc.stderr[-3000:]
    assert (out / "space.json").read_text() == before  # nothing written


def test_a_search_grown_by_add_trials_resumes_again(tmp_path):
    # The README's paper flow: --resume --add-trials 20, the driver dies, --resume. The stored
    # space.yaml (and the user's file) still say num_trials 2; the search's budget is 5.
    space, out = stored_search(tmp_path)
    grown, added = resumed_space(load_space(out / "space.yaml"), out, add_trials=3)
    assert (grown.num_trials, added) == (5, 3)
    store_space(grown, out, added)
    for given in (out / "space.yaml", space):
        assert resumed_space(load_space(given), out)[0].num_trials == 5  # was refused: 2 < 5
    assert resumed_space(load_space(out / "space.yaml"), out, add_trials=1)[0].num_trials == 6
    more = tmp_path / "more.yaml"  # the file itself raised by 2: on top of the added ones
    more.write_text(space.read_text().replace("num_trials: 2", "num_trials: 4"))
    assert [(s.num_trials, a) for s, a in [resumed_space(load_space(more), out)]] == [(7, 3)]
    # a file without `name:` is named after itself (more.yaml: "more"); the search keeps its own
    assert (resumed_space(load_space(more), out)[0].study_name, load_space(more).study_name) \
        == ("space", "more")
    less = tmp_path / "less.yaml"
    less.write_text(space.read_text().replace("num_trials: 2", "num_trials: 1"))
    with pytest.raises(UserError, match=r"search.num_trials 1 \(with the 3 --add-trials added\) "
                                         r"is below the search's 5"):
        resumed_space(load_space(less), out)


def test_resume_needs_a_search_or_a_space(tmp_path):
    proc = resume(None, tmp_path / "nothing")
    assert proc.returncode == 2 and "holds no search to resume" in proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "qlnas.cli", "search"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--space is needed" in proc.stderr, proc.stderr
