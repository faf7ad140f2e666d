"""Background writes step aside while the model computes a prefill, but never starve."""

from __future__ import annotations

import threading
import time

from kvcellar.tiers import writer
from kvcellar.tiers.writer import WriteQueue


class RecordingHandler:
    def __init__(self) -> None:
        self.written: list = []
        self.wrote = threading.Event()

    def delete_files(self, items: list) -> None:
        pass

    def write_batch(self, jobs: list, wait_turn) -> None:
        for job in jobs:
            wait_turn()
            self.written.append(job)
        self.wrote.set()

    def sync_recency(self) -> None:
        pass


def _queue_one(queue: WriteQueue, job: str) -> None:
    assert queue.try_reserve(10)
    queue.put(job, job, 10)


def test_writes_wait_for_the_prefill_to_end():
    handler = RecordingHandler()
    queue = WriteQueue(handler, max_entries=4, max_bytes=100)
    queue.start()
    queue.defer(True)
    _queue_one(queue, "block-a")
    assert not handler.wrote.wait(0.3)  # held back while the model computes
    queue.defer(False)
    assert handler.wrote.wait(2.0) and handler.written == ["block-a"]
    queue.close(5.0)


def test_a_long_prefill_does_not_starve_the_writer(monkeypatch):
    monkeypatch.setattr(writer, "MAX_DEFER_S", 0.2)
    handler = RecordingHandler()
    queue = WriteQueue(handler, max_entries=4, max_bytes=100)
    queue.start()
    queue.defer(True)
    started = time.monotonic()
    _queue_one(queue, "block-b")
    assert handler.wrote.wait(3.0)  # written although the "prefill" never ended
    assert time.monotonic() - started >= 0.15
    queue.defer(False)
    queue.close(5.0)


def test_a_full_queue_is_written_during_a_prefill():
    handler = RecordingHandler()
    queue = WriteQueue(handler, max_entries=4, max_bytes=100)
    queue.defer(True)
    for job in ("c", "d", "e", "f"):  # 4 of 4 entries: waiting longer would drop the next writes
        _queue_one(queue, job)
    queue.start()
    assert handler.wrote.wait(2.0)
    assert queue.flush(2.0) and handler.written == ["c", "d", "e", "f"]


def test_a_queue_with_room_waits_for_the_prefill():
    handler = RecordingHandler()
    queue = WriteQueue(handler, max_entries=4, max_bytes=100)
    queue.defer(True)
    for job in ("c", "d", "e"):  # 3 of 4: room left, so the prefill keeps the cores
        _queue_one(queue, job)
    queue.start()
    assert not handler.wrote.wait(0.3)
    queue.defer(False)
    assert queue.flush(2.0) and handler.written == ["c", "d", "e"]
    queue.defer(False)
    queue.close(5.0)


def test_a_write_refused_for_room_lets_the_queue_drain_during_a_prefill():
    handler = RecordingHandler()
    queue = WriteQueue(handler, max_entries=10, max_bytes=100)
    queue.defer(True)
    _queue_one(queue, "c")  # 1 of 10 entries: room by count ...
    queue.start()
    assert not handler.wrote.wait(0.3)
    assert not queue.try_reserve(95)  # ... but not by bytes: this write is dropped
    assert handler.wrote.wait(2.0)  # so the queue drains now rather than drop the next ones too
    queue.defer(False)
    queue.close(5.0)
