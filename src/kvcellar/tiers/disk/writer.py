"""The writer thread's side of the disk tier.

Operations: `DiskWriter` (the `WriteHandler` the write queue's thread calls:
`delete_files`, `write_batch`, `sync_recency`), `index_row`, `is_disk_full`.

Invariants kept here (see also index.py):
- a file is written and made durable, then indexed (commit), and only then
  is its record marked STORED and its in-memory payload dropped: until that
  moment lookups are served from the queued payload;
- a record dropped while its file was being written gets that file (and
  row) deleted right after; a failed write (ENOSPC...) removes the record
  and frees its bytes: a counted drop, never a partial file (temp + rename);
- a full disk (ENOSPC, SQLITE_FULL, in a file or in the index) also calls
  `on_disk_full`, which lowers the effective budget and queues evictions
  (done before the next file: writer.py); `on_idle` (with each recency
  sync) lets the tier raise it again once space is free;
- file first, row second on deletion: a crash leaves a row without a file,
  which start-up drops. A failed index commit never stops the thread: row
  deletions are retried with the next one, recency stays dirty.
The lock is held only for bookkeeping, never during file I/O.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import time
from collections.abc import Callable

from kvcellar.cache import CacheEntry
from kvcellar.tiers.disk.catalog import QUEUED, STORED, Record
from kvcellar.tiers.disk.state import DiskState
from kvcellar.tiers.disk.entry_io import write_entry
from kvcellar.tiers.disk.index import IndexRow

log = logging.getLogger(__name__)


def index_row(r: Record) -> IndexRow:
    return IndexRow(r.key, r.parent, r.namespace, r.num_bytes, r.payload_bytes, int(r.priority), r.last_used,
                    r.num_tokens, r.is_partial, r.has_logits)  # fmt: skip


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


class DiskWriter:
    def __init__(self, state: DiskState, on_disk_full: Callable[[], None] = lambda: None,
                 on_idle: Callable[[], None] = lambda: None) -> None:  # fmt: skip
        self._state = state
        self._on_disk_full = on_disk_full
        self._on_idle = on_idle  # with each recency sync: the tier regains budget after a full disk
        self._rows_to_delete: list[bytes] = []  # rows whose files are gone; kept until a commit succeeds

    def delete_files(self, items: list[tuple[bytes, bytes]]) -> None:
        """(key, namespace) pairs: unlink each file, then delete the rows in one commit."""
        state = self._state
        for key, namespace in items:
            state.dir.entry_path(namespace, key).unlink(missing_ok=True)
        self._rows_to_delete += [key for key, _ in items]
        self._commit(lambda: None, "deleting rows")

    def _commit(self, change: Callable[[], None], what: str) -> bool:
        """Apply `change` (and pending row deletions) to the index and commit; False (rolled back, counted) on error."""
        index = self._state.index
        try:
            if self._rows_to_delete:
                index.delete(self._rows_to_delete)
            change()
            index.commit()
        except sqlite3.Error as exc:
            index.rollback()
            with self._state.lock:
                self._state.counters["num_index_errors"] += 1
                num_errors = self._state.counters["num_index_errors"]
            if num_errors == 1 or num_errors % 100 == 0:
                log.warning("disk cache index error while %s (%d so far): %s", what, num_errors, exc)
            if is_disk_full(exc):
                self._on_disk_full()
            return False
        self._rows_to_delete = []
        self._state.measure_index()
        return True

    def write_batch(self, jobs: list[Record], wait_turn: Callable[[], None] = lambda: None) -> None:
        """Write each still-queued record's file, then index them in one commit.

        Pacing: `wait_turn()` before each file and inside it (before each tensor and the fsync): the
        queue's thread waits there while a prefill runs, and performs queued deletions (writer.py).
        """
        state = self._state
        written: list[tuple[Record, CacheEntry]] = []
        for record in jobs:
            if not self._still_queued(record):
                continue  # evicted or superseded while queued
            wait_turn()
            with state.lock:
                if not self._still_queued(record):
                    continue  # dropped while we waited
                entry, header = record.entry, record.header
            started = time.perf_counter()
            try:
                write_entry(state.path(record), header, entry.payload, state.codec, state.known_dirs, wait_turn)
            except Exception as exc:  # ENOSPC, EIO, a payload the codec cannot encode: a counted drop
                self._failed(record, exc)
                continue
            with state.lock:
                state.counters["num_written"] += 1
                state.counters["write_bytes"] += record.num_bytes
                state.counters["write_s"] += time.perf_counter() - started
            written.append((record, entry))
        if written:
            self._index(written)

    def _still_queued(self, record: Record) -> bool:
        with self._state.lock:
            return self._state.catalog.get(record.key) is record and record.state == QUEUED

    def _index(self, written: list[tuple[Record, CacheEntry]]) -> None:
        state = self._state
        rows = [(index_row(record), entry.token_ids) for record, entry in written]
        if not self._commit(lambda: state.index.put(rows), "indexing new files"):
            for record, _ in written:  # the index's own disk is full: undo the files, count the drops
                state.path(record).unlink(missing_ok=True)
                self._failed(record, None)
            return
        with state.lock:
            stale = [r for r, _ in written if state.catalog.get(r.key) is not r]
            for record, _ in written:
                if state.catalog.get(record.key) is record:
                    state.catalog.stored(record)
        if stale:  # dropped while being written: delete what was just made
            self.delete_files([(r.key, r.namespace) for r in stale])

    def _failed(self, record: Record, exc: BaseException | None) -> None:
        """A counted drop; `exc` None: the index commit failed (already reported)."""
        state = self._state
        with state.lock:
            state.counters["num_dropped_write_error"] += 1
            full = exc is not None and is_disk_full(exc)
            state.counters["num_disk_full"] += full
            if state.catalog.get(record.key) is record:
                state.catalog.remove(record)
            num_failed = state.counters["num_dropped_write_error"]
        if exc is not None and (num_failed == 1 or num_failed % 100 == 0):
            log.warning("disk cache write failed (%d so far), entry dropped: %s", num_failed, exc)
        if full:
            self._on_disk_full()

    def sync_recency(self) -> None:
        """Persist last-used clocks and raised priorities of stored entries (one commit; kept dirty if it fails)."""
        state = self._state
        with state.lock:
            records = [(key, state.catalog.get(key)) for key in state.dirty]
            updates = [(key, r.last_used, int(r.priority)) for key, r in records if r is not None and r.state == STORED]
            state.dirty = {key for key, r in records if r is not None and r.state != STORED}
        if updates and not self._commit(lambda: state.index.update_recency(updates), "saving recency"):
            with state.lock:
                state.dirty.update(key for key, _, _ in updates if state.catalog.get(key) is not None)
        self._on_idle()
