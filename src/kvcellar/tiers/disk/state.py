"""The state the disk tier's two threads share, behind one object: `DiskState`.

Operations: `DiskState.count` / `counters_snapshot` (counters; `COUNTERS` is
what stats always reports), `mark_recent` / `forget_recent` /
`take_recency` / `keep_recency` (the keys whose recency or priority the
index has not seen), `limit_bytes` / `set_limit` / `files_budget` /
`index_bytes` / `measure_index` (the budget), `path`, `metadata_entries`
(entries without payload, for lookups, and the records whose token ids
cannot be read), `read` / `write` (one entry file, timed for the
bandwidths), `closed` / `close`; `files_share`, `free_bytes`.

Budget: entry files + index (database, WAL, shm) <= `limit_bytes`, the
configured budget or, after the disk filled (ENOSPC), what was on disk
then, raised again (never past the budget) as the filesystem reports free
space (`free_bytes`, checked when the writer is idle; space.py). The files
get `limit_bytes - index_bytes - INDEX_SLACK_BYTES`: `index_bytes` is
measured after every commit, and the slack covers the WAL up to its
checkpoint size plus one transaction's growth before the next measurement.

Ownership: the tier (tier.py) builds it once recovery has filled the
catalog, and closes it; its space keeper (space.py) and the writer thread
(writer.py) hold references. `lock` (re-entrant) guards the catalog, the
counters, the recency set, the limits and `closed`: operations here take it
themselves, so a caller may call them holding it or not; a caller holds it
across any check-then-change of the catalog. No operation holds it during
file I/O (`read`, `write`). `index` is the writer thread's connection (and
start-up's and close's, when that thread is not running; its `size_bytes`,
a stat of its files, may be read from any thread); the reader connection
serves `metadata_entries` only, under the lock.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from kvcellar.cache import CacheEntry, Priority
from kvcellar.tiers.disk.catalog import Catalog, Record, RecordState
from kvcellar.tiers.codec import PayloadCodec
from kvcellar.tiers.disk.entry_io import Expected, RowMismatch, read_entry, write_entry
from kvcellar.tiers.disk.files import CacheDir
from kvcellar.tiers.format import EntryHeader
from kvcellar.tiers.disk.index import WAL_CHECKPOINT_BYTES, DiskIndex

log = logging.getLogger(__name__)

COUNTERS = (
    "num_loads", "load_bytes", "load_s", "num_loads_from_queue", "num_written", "write_bytes", "write_s",
    "num_evictions", "num_dropped_queue_full", "num_dropped_no_room", "num_dropped_write_error", "num_disk_full",
    "num_refused_payload", "num_refused_too_large", "num_corrupt", "num_missing", "num_unreadable", "num_quarantined",
    "num_bad_rows", "num_writes_cancelled", "num_index_errors",
)  # fmt: skip
INDEX_SLACK_BYTES = 2 * WAL_CHECKPOINT_BYTES


def files_share(limit_bytes: int, index_bytes: int) -> int:
    """Bytes entry files may occupy within `limit_bytes` beside an index of `index_bytes` (and its WAL's room)."""
    return max(0, limit_bytes - index_bytes - INDEX_SLACK_BYTES)


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still put on `path`'s filesystem."""
    info = os.statvfs(path)
    return info.f_bavail * info.f_frsize


class DiskState:
    def __init__(self, folder: CacheDir, codec: PayloadCodec, catalog: Catalog, index: DiskIndex,
                 limit_bytes: int) -> None:  # fmt: skip
        self.folder = folder
        self.catalog = catalog  # read and changed under `lock`
        self.index = index  # the writer thread's connection (module docstring)
        self.lock = threading.RLock()
        self._codec = codec
        self._reader = DiskIndex(folder.index_path)  # token ids for lookups, under `lock`
        self._counters: Counter = Counter()
        self._recent: set[bytes] = set()  # keys whose recency or priority the index has not seen
        self._known_dirs: set[Path] = set()  # namespace folders known to exist (writer thread)
        self._closed = False  # after close: nothing is stored, nothing is found (the index is shut)
        self._limit_bytes = limit_bytes  # the effective budget (module docstring)
        self._index_bytes = 0  # the index's bytes on disk at its last measurement
        self.measure_index()

    # -- counters ----------------------------------------------------------------------------

    def count(self, name: str, num: int = 1) -> int:
        """Add `num` to counter `name` (one of COUNTERS); returns its new value."""
        with self.lock:
            self._counters[name] += num
            return self._counters[name]

    def counters_snapshot(self) -> dict[str, float]:
        """Every counter (0 until it happens) plus the derived bandwidths."""
        with self.lock:
            counters: dict[str, float] = {**dict.fromkeys(COUNTERS, 0), **self._counters}
            counters["effective_budget_bytes"] = self._limit_bytes
        drops = ("num_dropped_queue_full", "num_dropped_no_room", "num_dropped_write_error")
        counters["num_dropped"] = sum(counters[k] for k in drops)
        counters["load_bandwidth_bytes_per_s"] = counters["load_bytes"] / counters["load_s"] if counters["load_s"] else 0.0
        counters["write_bandwidth_bytes_per_s"] = counters["write_bytes"] / counters["write_s"] if counters["write_s"] else 0.0
        return counters

    # -- recency the index has not seen ------------------------------------------------------

    def mark_recent(self, key: bytes) -> None:
        """Request side: `key` was touched (or its priority raised); the writer persists it when idle."""
        with self.lock:
            self._recent.add(key)

    def forget_recent(self, key: bytes) -> None:
        with self.lock:
            self._recent.discard(key)

    def take_recency(self) -> list[tuple[bytes, int, int]]:
        """Writer thread: (key, last_used, priority) of the marked keys now stored; those leave the set.

        Keys still queued stay marked (their row does not exist yet); keys gone are forgotten.
        """
        with self.lock:
            records = [(key, self.catalog.get(key)) for key in self._recent]
            stored = RecordState.STORED
            updates = [(key, r.last_used, int(r.priority)) for key, r in records if r is not None and r.state == stored]
            self._recent = {key for key, r in records if r is not None and r.state != stored}
        return updates

    def keep_recency(self, keys: Iterable[bytes]) -> None:
        """Writer thread, after a failed commit: mark `keys` again (those still held)."""
        with self.lock:
            self._recent.update(key for key in keys if self.catalog.get(key) is not None)

    # -- budget ------------------------------------------------------------------------------

    @property
    def limit_bytes(self) -> int:
        """The effective budget: the configured one, or lower after the disk filled."""
        return self._limit_bytes

    def set_limit(self, limit_bytes: int) -> None:
        with self.lock:
            self._limit_bytes = limit_bytes

    @property
    def index_bytes(self) -> int:
        """The index's bytes on disk at its last measurement."""
        return self._index_bytes

    def measure_index(self) -> None:
        """Writer thread (or start-up): record the index's size after a commit."""
        size = self.index.size_bytes()
        with self.lock:
            self._index_bytes = size

    def files_budget(self) -> int:
        """Bytes entry files may occupy now."""
        with self.lock:
            return files_share(self._limit_bytes, self._index_bytes)

    # -- entry files -------------------------------------------------------------------------

    def path(self, record: Record) -> Path:
        return self.folder.entry_path(record.namespace, record.key)

    def metadata_entries(self, records: list[Record]) -> tuple[list[CacheEntry], list[Record]]:
        """(entries without payload, records whose token ids cannot be read).

        Token ids come from memory (queued) or the index. A stored record whose token row is
        missing, or does not hold exactly its num_tokens ids, can never be looked up: the caller
        drops it (counted), so it neither holds budget nor blocks a new store of its key. An index
        that fails to answer at all is a miss for this call only (counted); nothing is dropped.
        """
        with self.lock:
            if self._closed:
                return [], []
            try:
                tokens = self._reader.tokens([r.key for r in records if r.entry is None])
            except sqlite3.Error as exc:
                num_errors = self.count("num_index_errors")
                if num_errors % 100 == 1:
                    log.warning("disk cache index read failed (%d so far), a miss: %s", num_errors, exc)
                return [], []
            found, unreadable = [], []
            for r in records:
                token_ids = r.entry.token_ids if r.entry is not None else tokens.get(r.key)
                if token_ids is None or len(token_ids) != r.num_tokens:
                    unreadable.append(r)
                    continue
                found.append(CacheEntry(r.key, r.parent, token_ids, r.payload_bytes, r.priority, None, r.is_tail,
                                        r.has_logits, r.last_used, r.num_pins, r.namespace))  # fmt: skip
        return found, unreadable

    def read(self, r: Record) -> CacheEntry:
        """The entry with its payload, from a file that passes every check (ReadFailure otherwise). No lock held."""
        expected = Expected(r.key, r.parent, r.namespace, r.num_bytes, r.is_tail, r.has_logits, r.num_tokens)
        started = time.perf_counter()
        try:
            header, payload = read_entry(self.path(r), expected, self._codec)
        except RowMismatch as exc:  # what the file holds, for the tier to re-index it (tier.py)
            h = exc.header
            exc.entry = CacheEntry(h.key, h.parent, h.token_ids, h.payload_bytes, Priority(h.priority), exc.payload,
                                   h.is_tail, h.has_logits, namespace=h.namespace)  # fmt: skip
            raise
        seconds = time.perf_counter() - started
        with self.lock:
            self._counters["num_loads"] += 1
            self._counters["load_bytes"] += r.num_bytes
            self._counters["load_s"] += seconds
        return CacheEntry(r.key, r.parent, header.token_ids, r.payload_bytes, r.priority, payload, r.is_tail,
                          r.has_logits, namespace=r.namespace)  # fmt: skip

    def write(self, record: Record, header: EntryHeader, payload: object, wait_turn: Callable[[], None]) -> None:
        """Writer thread: write `record`'s file atomically (raises on failure; nothing counted then). No lock held."""
        started = time.perf_counter()
        write_entry(self.path(record), header, payload, self._codec, self._known_dirs, wait_turn)
        seconds = time.perf_counter() - started
        with self.lock:
            self._counters["num_written"] += 1
            self._counters["write_bytes"] += record.num_bytes
            self._counters["write_s"] += seconds

    # -- life cycle --------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop serving lookups and close both index connections (the writer thread has stopped)."""
        with self.lock:
            self._closed = True
            self._reader.close()
        self.index.close()
