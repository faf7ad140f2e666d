"""Background writes step aside while the model computes a prefill, but never starve."""

from __future__ import annotations

import threading
import time

from kvcellar.tiers.disk import files, queue as writer
from kvcellar.tiers.codec import RawCodec
from kvcellar.tiers.blob import plan_header
from kvcellar.tiers.disk.entry_io import write_entry
from kvcellar.tiers.format import encode_header
from kvcellar.tiers.disk.queue import WriteQueue

from .helpers import ROOT_A, check_consistent, file_of, make_block, open_tier, store


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


# -- inside one file: a prefill that starts while a file is being written holds the rest of it back ----


def test_write_entry_pauses_before_each_tensor_and_before_the_fsync(tmp_path):
    entry = make_block(ROOT_A, [1, 2, 3, 4])
    header = plan_header(entry, RawCodec())
    target = tmp_path / "entry.safetensors"
    seen: list[tuple[bool, int]] = []  # at each pause: (final file exists, bytes in the temp file so far)

    def pause() -> None:
        temps = list(tmp_path.glob("*.tmp"))
        seen.append((target.exists(), temps[0].stat().st_size if temps else 0))

    size = write_entry(target, header, entry.payload, RawCodec(), set(), pause)
    head = len(encode_header(header))  # the header chunk (its checksum digits still zeros)
    keys, values = (len(entry.payload[name]) for name in ("0.keys", "0.values"))
    assert size == header.file_size == head + keys + values
    # before the header, before each of the 2 tensors, before the fsync; the file appears only after
    assert seen == [(False, 0), (False, head), (False, head + keys), (False, size)]
    assert target.stat().st_size == size


def test_a_prefill_starting_inside_a_file_holds_the_rest_back(tmp_path, monkeypatch):
    tier = open_tier(tmp_path / "cache")
    entry = make_block(ROOT_A, [5, 6, 7, 8])
    real_write = files.write_chunks
    header_written = threading.Event()

    def write_then_start_a_prefill(fd, chunks):
        chunks = iter(chunks)
        total = real_write(fd, [next(chunks)])  # the header, written while the model is idle
        tier.defer_writes(True)  # a prefill starts now, in the middle of the file
        header_written.set()
        return total + real_write(fd, chunks)

    monkeypatch.setattr(files, "write_chunks", write_then_start_a_prefill)
    assert store(tier, entry)
    assert header_written.wait(5.0)
    time.sleep(0.3)
    (temp,) = list(file_of(tier, entry).parent.glob("*.tmp"))
    assert temp.stat().st_size == len(encode_header(plan_header(entry, RawCodec())))  # no tensor byte during the prefill
    assert not file_of(tier, entry).exists()
    tier.defer_writes(False)
    assert tier.flush(5.0)
    assert check_consistent(tier) == 1
    tier.close()
