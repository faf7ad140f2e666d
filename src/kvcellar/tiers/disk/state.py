"""State the disk tier's two sides share: folder, codec, catalog, index connections, counters, one lock.

Operations: `DiskState.path`, `.metadata_entries` (entries without payload,
for lookups, and the records whose token ids cannot be read), `.read` (load
and verify one entry file, timed for the load bandwidth; a RowMismatch
carries the file's entry), `.files_budget` / `.measure_index` (the budget's
share left for entry files: `files_share`), `.counters_snapshot`; `COUNTERS` (what stats
always reports).

Budget: entry files + index (database, WAL, shm) <= `limit_bytes`, the
configured budget or, after the disk filled (ENOSPC), what was on disk
then, raised again (never past the budget) as the filesystem reports free
space (`free_bytes`, checked when the writer is idle). The files get `limit_bytes - index_bytes - INDEX_SLACK_BYTES`:
`index_bytes` is measured after every commit, and the slack covers the
WAL up to its checkpoint size plus one transaction's growth before the
next measurement.

Threads: the request side (disk.py) and the writer thread (disk_writer.py)
change the catalog, counters and dirty set only under `lock`; neither holds
it during file I/O. `index` belongs to the writer thread (and to start-up and
close, when that thread is not running); `reader` is used under `lock`.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from kvcellar.cache import CacheEntry, Priority
from kvcellar.tiers.disk.catalog import Catalog, Record
from kvcellar.tiers.disk.codec import PayloadCodec
from kvcellar.tiers.disk.entry_io import Expected, RowMismatch, read_entry
from kvcellar.tiers.disk.files import CacheDir
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


@dataclass
class DiskState:
    dir: CacheDir
    codec: PayloadCodec
    catalog: Catalog
    index: DiskIndex  # the writer thread's connection (and start-up's, before the thread runs)
    reader: DiskIndex  # token ids for lookups, used under `lock`
    lock: threading.RLock = field(default_factory=threading.RLock)
    counters: Counter = field(default_factory=Counter)
    dirty: set[bytes] = field(default_factory=set)  # keys whose recency or priority the index has not seen
    known_dirs: set[Path] = field(default_factory=set)
    closed: bool = False  # after close: nothing is stored, nothing is found (the index is shut)
    limit_bytes: int = 0  # the effective budget (module docstring); set by the tier, lowered on ENOSPC
    index_bytes: int = 0  # the index's bytes on disk at its last measurement

    def measure_index(self) -> None:
        """Writer thread (or start-up): record the index's size after a commit."""
        size = self.index.size_bytes()
        with self.lock:
            self.index_bytes = size

    def files_budget(self) -> int:
        """Bytes entry files may occupy now. Call under `lock`."""
        return files_share(self.limit_bytes, self.index_bytes)

    def path(self, record: Record) -> Path:
        return self.dir.entry_path(record.namespace, record.key)

    def metadata_entries(self, records: list[Record]) -> tuple[list[CacheEntry], list[Record]]:
        """(entries without payload, records whose token ids cannot be read). Call under `lock`.

        Token ids come from memory (queued) or the index. A stored record whose token row is
        missing, or does not hold exactly its num_tokens ids, can never be looked up: the caller
        drops it (counted), so it neither holds budget nor blocks a new store of its key. An index
        that fails to answer at all is a miss for this call only (counted); nothing is dropped.
        """
        if self.closed:
            return [], []
        try:
            tokens = self.reader.tokens([r.key for r in records if r.entry is None])
        except sqlite3.Error as exc:
            self.counters["num_index_errors"] += 1
            if self.counters["num_index_errors"] % 100 == 1:
                log.warning("disk cache index read failed (%d so far), a miss: %s", self.counters["num_index_errors"], exc)
            return [], []
        found, unreadable = [], []
        for r in records:
            token_ids = r.entry.token_ids if r.entry is not None else tokens.get(r.key)
            if token_ids is None or len(token_ids) != r.num_tokens:
                unreadable.append(r)
                continue
            found.append(CacheEntry(r.key, r.parent, token_ids, r.payload_bytes, r.priority, None, r.is_partial,
                                    r.has_logits, r.last_used, r.num_pins, r.namespace))  # fmt: skip
        return found, unreadable

    def read(self, r: Record) -> CacheEntry:
        """The entry with its payload, from a file that passes every check (ReadFailure otherwise). No lock held."""
        expected = Expected(r.key, r.parent, r.namespace, r.num_bytes, r.is_partial, r.has_logits, r.num_tokens)
        started = time.perf_counter()
        try:
            header, payload = read_entry(self.path(r), expected, self.codec)
        except RowMismatch as exc:  # what the file holds, for the tier to re-index it (disk.py)
            h = exc.header
            exc.entry = CacheEntry(h.key, h.parent, h.token_ids, h.payload_bytes, Priority(h.priority), exc.payload,
                                   h.is_partial, h.has_logits, namespace=h.namespace)  # fmt: skip
            raise
        seconds = time.perf_counter() - started
        with self.lock:
            self.counters["num_loads"] += 1
            self.counters["load_bytes"] += r.num_bytes
            self.counters["load_s"] += seconds
        return CacheEntry(r.key, r.parent, header.token_ids, r.payload_bytes, r.priority, payload, r.is_partial,
                          r.has_logits, namespace=r.namespace)  # fmt: skip

    def counters_snapshot(self) -> dict[str, float]:
        """Every counter (0 until it happens) plus the derived bandwidths. Call under `lock`."""
        counters: dict[str, float] = {**dict.fromkeys(COUNTERS, 0), **self.counters}
        drops = ("num_dropped_queue_full", "num_dropped_no_room", "num_dropped_write_error")
        counters["num_dropped"] = sum(counters[k] for k in drops)
        counters["effective_budget_bytes"] = self.limit_bytes
        counters["load_bandwidth_bytes_per_s"] = counters["load_bytes"] / counters["load_s"] if counters["load_s"] else 0.0
        counters["write_bandwidth_bytes_per_s"] = counters["write_bytes"] / counters["write_s"] if counters["write_s"] else 0.0
        return counters
