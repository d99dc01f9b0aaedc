"""An exception inside an FFCV pipeline ends the epoch's iteration with that error within
seconds; FFCV's own loader waits for the dead thread's next batch forever."""

import threading
import time
from dataclasses import replace

import pytest
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.pipeline.operation import Operation
from ffcv.transforms import ToTensor

from qlnas.data.guard import GuardedLoader, LoaderFailed


class FailsAtBatch(Operation):
    """Passes batches through (in Python, after ToTensor) and raises at batch `at`."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def generate_code(self):
        seen = [0]
        at = self.at

        def passthrough(images, _dst):
            seen[0] += 1
            if seen[0] == at:
                raise OSError("read error on the shared filesystem")
            return images

        return passthrough

    def declare_state_and_memory(self, previous_state):
        return replace(previous_state, jit_mode=False), None


def consume(loader_type, path, outcome: dict) -> None:
    loader = loader_type(str(path), batch_size=16, num_workers=1, order=OrderOption.SEQUENTIAL,
                         pipelines={"image": [CenterCropRGBImageDecoder((32, 32), 1.0),
                                              ToTensor(), FailsAtBatch(at=3)],
                                    "label": [IntDecoder()]})
    outcome["batches"] = 0
    try:
        for _ in loader:
            outcome["batches"] += 1
    except Exception as exc:  # noqa: BLE001  (what the test looks at)
        outcome["error"] = exc
    outcome["done"] = time.time()


def run_in_thread(loader_type, path, wait_s: float) -> dict:
    outcome: dict = {}
    thread = threading.Thread(target=consume, args=(loader_type, path, outcome), daemon=True)
    start = time.time()
    thread.start()
    thread.join(wait_s)
    outcome["start"] = start
    return outcome


def test_an_exception_in_a_pipeline_ends_the_epoch(demo_betons):
    outcome = run_in_thread(GuardedLoader, demo_betons[1], wait_s=120)
    assert "done" in outcome, "the guarded loader hung"
    assert outcome["batches"] == 2
    error = outcome["error"]
    assert isinstance(error, LoaderFailed)
    assert str(error).startswith(f"{demo_betons[1]}: loading failed: OSError: read error")
    assert isinstance(error.__cause__, OSError)


@pytest.mark.slow
def test_ffcv_alone_hangs_on_the_same_pipeline(demo_betons):
    """Why the guard exists: the same failure under FFCV's Loader never returns."""
    outcome = run_in_thread(Loader, demo_betons[1], wait_s=15)
    assert "done" not in outcome and outcome["batches"] == 2


def test_a_file_gone_before_a_streamed_epoch_ends_it(demo_betons, tmp_path):
    """The per-process page cache (os_cache=False): its page readers cannot open the file
    (a shared filesystem that dropped it), and the epoch ends with that reason; FFCV's
    waits for the pages forever."""
    path = tmp_path / "train.beton"
    path.write_bytes(demo_betons[0].read_bytes())
    loader = GuardedLoader(str(path), batch_size=16, num_workers=1, os_cache=False,
                           order=OrderOption.SEQUENTIAL,
                           pipelines={"image": [CenterCropRGBImageDecoder((32, 32), 1.0)],
                                      "label": [IntDecoder()]})
    path.unlink()
    outcome: dict = {}

    def consume():
        try:
            next(iter(loader))
        except Exception as exc:  # noqa: BLE001  (what the test looks at)
            outcome["error"] = exc

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    thread.join(120)
    assert "error" in outcome, "the streamed epoch hung"
    error = outcome["error"]
    assert isinstance(error, LoaderFailed), repr(error)
    assert str(error) == f"{path}: its pages can no longer be read (No such file or directory)"


def test_a_loader_thread_that_ends_without_a_word_ends_the_epoch(demo_betons, monkeypatch):
    """The consumer stops waiting when the epoch's thread is gone and left nothing behind."""
    from qlnas.data.guard import GuardedEpochIterator

    monkeypatch.setattr(GuardedEpochIterator, "run", lambda self: None)  # dies at once
    loader = GuardedLoader(str(demo_betons[1]), batch_size=16, num_workers=1,
                           order=OrderOption.SEQUENTIAL,
                           pipelines={"image": [CenterCropRGBImageDecoder((32, 32), 1.0)],
                                      "label": [IntDecoder()]})
    with pytest.raises(LoaderFailed, match="the loader's thread ended without a batch or an "
                                           "error"):
        next(iter(loader))
