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
  (done before the next file: queue.py); `on_idle` (with each recency
  sync) lets the tier raise it again once space is free (space.py);
- file first, row second on deletion: a crash leaves a row without a file,
  which start-up drops. A failed index commit never stops the thread: row
  deletions are retried with the next one, recency stays dirty.
Everything shared with the request side goes through `DiskState` (state.py),
whose lock is held only for bookkeeping, never during file I/O.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
from collections.abc import Callable

from kvcellar.cache import CacheEntry
from kvcellar.tiers.disk.catalog import Record, RecordState
from kvcellar.tiers.disk.index import IndexRow
from kvcellar.tiers.disk.state import DiskState

log = logging.getLogger(__name__)


def index_row(r: Record) -> IndexRow:
    return IndexRow(r.key, r.parent, r.namespace, r.num_bytes, r.payload_bytes, int(r.priority), r.last_used,
                    r.num_tokens, r.is_tail, r.has_logits)  # fmt: skip


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
        for key, namespace in items:
            self._state.folder.entry_path(namespace, key).unlink(missing_ok=True)
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
            num_errors = self._state.count("num_index_errors")
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
        queue's thread waits there while a prefill runs, and performs queued deletions (queue.py).
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
            try:
                state.write(record, header, entry.payload, wait_turn)
            except Exception as exc:  # ENOSPC, EIO, a payload the codec cannot encode: a counted drop
                self._failed(record, exc)
                continue
            written.append((record, entry))
        if written:
            self._index(written)

    def _still_queued(self, record: Record) -> bool:
        with self._state.lock:
            return self._state.catalog.get(record.key) is record and record.state == RecordState.QUEUED

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
        full = exc is not None and is_disk_full(exc)
        with state.lock:
            num_failed = state.count("num_dropped_write_error")
            state.count("num_disk_full", full)
            if state.catalog.get(record.key) is record:
                state.catalog.remove(record)
        if exc is not None and (num_failed == 1 or num_failed % 100 == 0):
            log.warning("disk cache write failed (%d so far), entry dropped: %s", num_failed, exc)
        if full:
            self._on_disk_full()

    def sync_recency(self) -> None:
        """Persist last-used clocks and raised priorities of stored entries (one commit; kept dirty if it fails)."""
        state = self._state
        updates = state.take_recency()
        if updates and not self._commit(lambda: state.index.update_recency(updates), "saving recency"):
            state.keep_recency(key for key, _, _ in updates)
        self._on_idle()
