"""FFCV's loader, whose failures reach the training loop.

FFCV decodes each epoch in a thread (`EpochIterator`) that hands batches to the consumer
through a queue. When anything in a pipeline raises, that thread dies and the consumer waits on
the queue forever: an 8-GPU job frozen, not failed. Here the thread's exception is handed over
through the same queue, and a consumer that finds the thread gone without a word stops waiting.
"""

from __future__ import annotations

import queue
import threading

from ffcv.loader import Loader
from ffcv.loader.epoch_iterator import IS_CUDA, EpochIterator
from ffcv.memory_managers.process_cache import ProcessCacheContext, ProcessCacheManager
from ffcv.pipeline.compiler import Compiler

POLL_S = 1.0  # how often a waiting consumer checks that the thread is alive


class LoaderFailed(RuntimeError):
    """The loader's decoding thread raised, or died."""


JOIN_S = 10.0  # how long closing waits for the batch in flight


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Closed(Exception):
    """The consumer closed the iterator: decode no further batch."""


class GuardedEpochIterator(EpochIterator):
    """FFCV's epoch thread; its exception, or its death, ends the consumer's wait, and closing
    it stops it after the batch in flight (FFCV's goes on decoding until its queue is full)."""

    def run(self) -> None:
        try:
            super().run()
        except _Closed:
            return
        except BaseException as exc:  # noqa: BLE001  (handed to the consumer, raised there)
            self._hand_over(_Failure(exc))

    def run_pipeline(self, *args, **kwargs):
        if self.terminate_event.is_set():
            raise _Closed
        return super().run_pipeline(*args, **kwargs)

    def close(self) -> None:
        super().close()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(JOIN_S)

    def _hand_over(self, item: object) -> None:
        while not self.terminate_event.is_set():
            try:
                self.output_queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def __next__(self):
        while True:
            try:
                item = self.output_queue.get(timeout=POLL_S)
                break
            except queue.Empty:
                if not self.is_alive() and self.output_queue.empty():
                    self.close()
                    raise LoaderFailed(f"{self.loader.reader.file_name}: the loader's thread "
                                       "ended without a batch or an error") from None
        if item is None:
            self.close()
            raise StopIteration()
        if isinstance(item, _Failure):
            self.close()
            if isinstance(item.exc, LoaderFailed):  # says what failed already
                raise item.exc
            raise LoaderFailed(f"{self.loader.reader.file_name}: loading failed: "
                               f"{type(item.exc).__name__}: {item.exc}") from item.exc
        slot, result = item
        if IS_CUDA:
            self.current_stream.wait_stream(self.cuda_streams[slot])
        return result


class GuardedProcessCacheContext(ProcessCacheContext):
    """FFCV's per-process page cache for one epoch, whose wait for a page ends when the
    threads that read pages are gone (FFCV's waits forever: a file that became unreadable,
    say a shared filesystem that dropped it, froze the job)."""

    def start_batch(self, batch: int):
        executor, schedule = self.executor, self.executor.schedule
        for page in schedule.can_prefetch_at[batch]:
            executor.queries.put((page, schedule.page_to_slot[page]))
        for page in schedule.entering_at[batch]:
            while page not in executor.loaded:
                try:
                    executor.loaded.add(executor.loaded_queue.get(timeout=POLL_S))
                except queue.Empty:
                    if not any(t.is_alive() for t in executor.threads):
                        raise LoaderFailed(f"{self.fname}: its pages can no longer be read "
                                           f"({_unreadable(self.fname)})") from None
        executor.next_batch = batch + 1


def _unreadable(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        return exc.strerror or str(exc)
    return "the threads reading them stopped"


class GuardedProcessCacheManager(ProcessCacheManager):
    """ProcessCacheManager whose epochs wait on pages as GuardedProcessCacheContext does."""

    def schedule_epoch(self, batches) -> GuardedProcessCacheContext:
        return GuardedProcessCacheContext(self, batches)


class GuardedLoader(Loader):
    """FFCV's Loader whose epochs run in a GuardedEpochIterator (its `__iter__`, otherwise
    unchanged), and whose per-process page cache (`os_cache=False`) is guarded too."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if type(self.memory_manager) is ProcessCacheManager:
            # The subclass only changes how an epoch waits; the tables FFCV built stay.
            self.memory_manager.__class__ = GuardedProcessCacheManager

    def __iter__(self) -> GuardedEpochIterator:
        Compiler.set_num_threads(self.num_workers)
        order = self.next_traversal_order()
        selected = order[:len(self) * self.batch_size]
        self.next_epoch += 1
        if self.code is None or self.recompile:
            self.generate_code()
        return GuardedEpochIterator(self, selected)
