"""The disk tier: one safetensors file per entry, a SQLite index, a background writer.

Operations: `DiskTier` (the `Tier` protocol, plus `start`, `flush`, `close`;
`stats` reports load bandwidth, drops and corrupt files) and, for
`kvcellar cache stats|ls|clear` with no model, `disk_cache_stats`,
`list_disk_entries`, `clear_disk_cache` (admin.py).

Life of an entry: `prepare_store` reserves its exact file size (evicting
visible leaves, LRU: a queued victim's write is cancelled) and a write-queue
slot, or refuses (a counted drop);
`complete_store` makes it visible at once, served from the queued payload;
the writer thread writes the file atomically, indexes it, and only then
drops the payload from memory: never in neither place, and requests never
wait on a write. Loads map the file and check size, header, key hash, layout
and checksum; a file that fails is quarantined: a miss, counted, never served.
Faults of the index never raise (index_repair.py, recovery.py): a record whose
token ids cannot be read is dropped on sight (`num_bad_rows`), and a valid file
whose row disagrees with it is a miss, stored again from the file (never
quarantined).
Budget and evictions: space.py (entry files + index + WAL within the
budget, beyond the one file being written; a full disk lowers the effective
budget).
Threads: what the request side shares with the writer thread (catalog,
counters, recency, limits) is one `DiskState` (state.py), whose lock guards
it, never file I/O. The directory is flock'ed while open: one process at a
time. Close, or interpreter exit, flushes the queue.
"""
from __future__ import annotations

import atexit
import logging
import time
import weakref
from collections.abc import Collection, Iterable
from pathlib import Path

from kvcellar.cache import BlockHash, CacheEntry, Priority, StoreResult, TierStats
from kvcellar.cache.policy import DEFAULT_EVICTION_POLICY
from kvcellar.cache.tier import check_budget
from kvcellar.tiers.disk.admin import clear_disk_cache, disk_cache_stats, list_disk_entries
from kvcellar.tiers.disk.catalog import Catalog, Record, RecordState
from kvcellar.tiers.codec import PayloadCodec
from kvcellar.tiers.blob import plan_header
from kvcellar.tiers.disk.entry_io import ReadFailure
from kvcellar.tiers.disk.files import CacheDir, DirLock, quarantine
from kvcellar.tiers.format import DEFAULT_CHECKSUM
from kvcellar.tiers.disk.queue import WriteQueue
from kvcellar.tiers.disk.recovery import recover
from kvcellar.tiers.disk.space import DiskSpace
from kvcellar.tiers.disk.state import INDEX_SLACK_BYTES, DiskState
from kvcellar.tiers.disk.writer import DiskWriter

__all__ = ["DiskTier", "clear_disk_cache", "disk_cache_stats", "list_disk_entries"]
log = logging.getLogger(__name__)
_open_tiers: weakref.WeakSet[DiskTier] = weakref.WeakSet()


class DiskTier:
    name = "disk"

    def __init__(self, cache_dir: str | Path, budget_bytes: int, codec: PayloadCodec, *,
                 policy: str = DEFAULT_EVICTION_POLICY, max_queue_entries: int = 256, max_queue_bytes: int = 1 << 30,
                 checksum: str = DEFAULT_CHECKSUM, start_writer: bool = True) -> None:  # fmt: skip
        """Open (or create) `cache_dir`: lock it, reconcile index and files, prune to the budget, start the writer."""
        check_budget(budget_bytes)
        started = time.perf_counter()
        folder = CacheDir(cache_dir)
        folder.create()
        self._dir_lock = DirLock(folder.lock_path)
        self._dir_lock.acquire()
        try:
            catalog = Catalog(policy)
            # A damaged index is rebuilt here; the files are pruned to what the budget leaves beside the index.
            index, self._recovery = recover(folder, catalog, budget_bytes)
            state = DiskState(folder, codec, catalog, index, limit_bytes=budget_bytes)
        except BaseException:
            self._dir_lock.release()
            raise
        self._state = state
        self._catalog, self._lock = catalog, state.lock  # the state's own objects, never rebound
        self._dir, self._codec, self._checksum = folder, codec, checksum
        # The writer calls back into the space keeper, built once the queue exists.
        writer = DiskWriter(state, lambda: self._space.disk_full(), lambda: self._space.regain_space())
        self._queue = WriteQueue(writer, max_queue_entries, max_queue_bytes)
        self._space = DiskSpace(state, self._queue, budget_bytes)
        self._closed = False  # no store is accepted (set before the queue drains; the state closes after)
        self._open_s = time.perf_counter() - started
        if start_writer:
            self._queue.start()
        _open_tiers.add(self)

    # -- reads -------------------------------------------------------------------------------

    @property
    def cache_dir(self) -> Path:
        return self._dir.root

    @property
    def num_bytes(self) -> int:
        return self._catalog.num_bytes

    @property
    def num_entries(self) -> int:
        return self._catalog.usage()[0]

    @property
    def budget_bytes(self) -> int:
        return self._space.budget_bytes

    @budget_bytes.setter
    def budget_bytes(self, budget_bytes: int) -> None:
        self.set_budget(budget_bytes)

    def get(self, key: BlockHash) -> CacheEntry | None:
        with self._lock:
            record = self._catalog.visible(key)
            found = self._metadata([record]) if record is not None else []
            return found[0] if found else None

    def contains(self, key: BlockHash) -> bool:
        with self._lock:
            return self._catalog.visible(key) is not None

    def children(self, parent: BlockHash) -> list[CacheEntry]:
        with self._lock:
            return self._metadata(self._catalog.children(parent))

    def sample_key(self, namespace: BlockHash) -> BlockHash | None:
        """The most recently used stored whole block of `namespace` (to time one load at start-up), or None.

        Only the caller's namespace: another model's block would fail its layout check, and a failed
        check quarantines the file, a valid block of that other model.
        """
        with self._lock:
            stored = [r for r in self._catalog
                      if r.state == RecordState.STORED and not r.is_tail and r.namespace == namespace]  # fmt: skip
            return max(stored, key=lambda r: r.last_used).key if stored else None

    def entries(self) -> list[CacheEntry]:
        with self._lock:
            return self._metadata([r for r in self._catalog if r.state != RecordState.RESERVED])

    def _metadata(self, records: list[Record]) -> list[CacheEntry]:
        """Entries of `records`; a record whose token ids cannot be read is dropped (counted). Under the lock."""
        entries, unreadable = self._state.metadata_entries(records)
        if unreadable:
            self._state.count("num_bad_rows", len(unreadable))
            log.warning("disk cache: %d index rows without usable token ids dropped (first %s)", len(unreadable),
                        unreadable[0].key.hex()[:16])  # fmt: skip
            self._space.drop(*unreadable)
        return entries

    # -- load --------------------------------------------------------------------------------

    def prepare_load(self, keys: Iterable[BlockHash]) -> list[CacheEntry]:
        """Read and verify each entry; pins cover only the read (so `complete_load` is a no-op)."""
        with self._lock:
            records = [self._catalog.visible(key) for key in keys]
            if any(record is None for record in records):
                raise KeyError("the disk tier no longer holds an entry; look it up again")
            queued = {r.key: r.entry for r in records if r.state != RecordState.STORED}
            self._state.count("num_loads_from_queue", len(queued))
            for record in records:
                record.num_pins += 1
                self._catalog.touch(record)
                self._state.mark_recent(record.key)
        loaded, failure = [], None
        try:
            for record in records:
                if record.key in queued:  # not written yet: served from the queued payload
                    loaded.append(queued[record.key].copy_for_tier())
                    continue
                try:
                    loaded.append(self._state.read(record))
                except ReadFailure as exc:
                    failure = (record, exc)
                    break
        finally:
            with self._lock:
                for record in records:
                    self._catalog.unpin(record)
                if failure is not None:
                    self._load_failed(*failure)
        if failure is not None:
            raise KeyError(f"disk entry {failure[0].key.hex()} cannot be served ({failure[1]}); it was dropped")
        return loaded

    def _load_failed(self, record: Record, failure: ReadFailure) -> None:
        if failure.entry is not None:  # a valid file its row misdescribes
            self._row_disagrees(record, failure)
            return
        self._state.count(f"num_{failure.kind}")  # num_corrupt / num_missing / num_unreadable
        log.warning("disk cache entry %s not served (%s: %s)", record.key.hex()[:16], failure.kind, failure)
        if self._catalog.get(record.key) is record:
            if failure.kind == "corrupt" and quarantine(self._dir, self._state.path(record), str(failure)):
                self._state.count("num_quarantined")
            self._space.drop(record)

    def _row_disagrees(self, record: Record, failure: ReadFailure) -> None:
        """The file passed its own checks but its row says otherwise: a miss now, the row re-derived from the file.

        The lookup that chose this record used the row's values, so this load is not served. The
        record is dropped and the verified entry stored again (rewritten, then indexed from what it
        is), unless that store is refused (a counted drop, like any store).
        """
        self._state.count("num_bad_rows")
        log.warning("disk cache entry %s: its index row disagrees with its valid file (%s); re-indexed from the file",
                    record.key.hex()[:16], failure)  # fmt: skip
        if self._catalog.get(record.key) is record:
            self._space.drop(record)
            entry = failure.entry
            entry.priority = max(entry.priority, record.priority)
            if self.prepare_store(entry).accepted:
                self.complete_store(entry.key)

    def complete_load(self, keys: Iterable[BlockHash]) -> None:
        pass  # the payload was copied out (mapped) inside prepare_load

    # -- store -------------------------------------------------------------------------------

    def prepare_store(self, entry: CacheEntry) -> StoreResult:
        """Reserve the file's bytes and a queue slot, evicting stored leaves; or refuse (counted)."""
        with self._lock:
            if self._closed:
                return StoreResult(False, (), "the disk tier is closed")
            existing = self._catalog.get(entry.key)
            if existing is not None and existing.state == RecordState.STORED:
                self._metadata([existing])  # one whose token ids cannot be read is dropped: it must not block this store
                existing = self._catalog.get(entry.key)
            if existing is not None:
                supersedes = entry.has_logits and not existing.has_logits and existing.state != RecordState.RESERVED
                if not supersedes:
                    self._catalog.touch(existing, entry.priority)
                    self._state.mark_recent(entry.key)
                    return StoreResult(True, (), "already stored")
                self._space.drop(existing)  # the same tail with logits replaces it
            try:
                header = plan_header(entry, self._codec, self._checksum)
            except (ValueError, TypeError, AttributeError) as exc:
                return self._refused("num_refused_payload", f"cannot store this payload on disk: {exc}")
            size = header.file_size
            if size > self._state.files_budget():
                too_large = (f"entry of {size} bytes exceeds the disk budget of {self._state.limit_bytes} bytes "
                             f"less the index's {self._state.index_bytes + INDEX_SLACK_BYTES}")  # fmt: skip
                return self._refused("num_refused_too_large", too_large)
            if not self._queue.try_reserve(size):
                entries, queued = self._queue.depth
                return self._refused("num_dropped_queue_full", f"disk write queue full ({entries} entries, {queued} bytes)")
            evicted = self._space.evict_for(size, entry.parent)
            if evicted is None:
                self._queue.unreserve(size)
                no_room = f"cannot free {size} bytes on disk: the rest is queued, pinned or parents"
                return self._refused("num_dropped_no_room", no_room)
            record = Record(entry.key, entry.parent, header.namespace, size, sum(s.num_bytes for s in header.tensors),
                            entry.priority, self._catalog.tick(), entry.num_tokens, entry.is_tail, entry.has_logits,
                            state=RecordState.RESERVED, entry=entry, header=header)  # fmt: skip
            self._catalog.add(record)
            return StoreResult(True, evicted)

    def _refused(self, counter: str, reason: str) -> StoreResult:
        self._state.count(counter)
        return StoreResult(False, (), reason)

    def complete_store(self, key: BlockHash) -> None:
        with self._lock:
            record = self._catalog.get(key)
            if record is None:
                raise KeyError(f"the disk tier has no reservation for {key.hex()}; call prepare_store first")
            if record.state == RecordState.RESERVED:
                self._catalog.publish(record)
                self._queue.put(key, record, record.num_bytes)

    def abort_store(self, key: BlockHash) -> None:
        with self._lock:
            record = self._catalog.get(key)
            if record is not None and record.state == RecordState.RESERVED:
                self._catalog.remove(record)
                self._queue.unreserve(record.num_bytes)

    # -- bookkeeping -------------------------------------------------------------------------

    def touch(self, keys: Iterable[BlockHash]) -> None:
        with self._lock:
            for key in keys:
                record = self._catalog.visible(key)
                if record is not None:
                    self._catalog.touch(record)
                    self._state.mark_recent(key)

    def evict(self, key: BlockHash) -> CacheEntry | None:
        """Remove exactly this entry (even pinned or a parent); its file goes on the writer thread."""
        with self._lock:
            record = self._catalog.visible(key)
            return self._space.evict([record], counted=False)[0] if record is not None else None

    def set_budget(self, budget_bytes: int) -> tuple[CacheEntry, ...]:
        """Change the budget, evicting leaves at once; returns once their files are deleted (space.py)."""
        return self._space.set_budget(budget_bytes, self.flush)

    def clear(self) -> None:
        """Remove every visible entry (files deleted on the writer thread); reservations stay."""
        with self._lock:
            self._space.drop(*(record for record in self._catalog if record.state != RecordState.RESERVED))

    # -- reporting and life cycle ------------------------------------------------------------

    def stats(self) -> TierStats:
        with self._lock:
            num_entries, num_tails, counts, sizes = self._catalog.usage()
            counters = {**self._recovery, **self._state.counters_snapshot()}
            num_bytes = self._catalog.num_bytes
        counters["num_queued"], counters["queued_bytes"] = self._queue.depth
        counters["open_s"] = self._open_s
        counters["index_bytes"] = self._state.index.size_bytes()
        return TierStats(self.name, num_entries, num_tails, num_bytes, self.budget_bytes, counts, sizes, counters)

    def usage_of(self, namespaces: Collection[BlockHash]) -> TierStats:
        """Occupancy by the visible entries of `namespaces` only, from the catalog (the index is not read)."""
        with self._lock:
            records = [r for r in self._catalog if r.state != RecordState.RESERVED and r.namespace in namespaces]
        counts = {priority.name: 0 for priority in Priority}
        sizes = dict(counts)
        for record in records:
            counts[record.priority.name] += 1
            sizes[record.priority.name] += record.payload_bytes
        return TierStats(self.name, len(records), sum(r.is_tail for r in records), sum(r.num_bytes for r in records),
                         self.budget_bytes, counts, sizes)  # fmt: skip

    def start(self) -> None:
        """Start the writer thread (for a tier opened with start_writer=False)."""
        self._queue.start()

    def defer_writes(self, active: bool) -> None:
        """The engine is (not) computing a prefill: hold background writes back meanwhile."""
        self._queue.defer(active)

    def flush(self, timeout_s: float | None = None) -> bool:
        return True if self._closed else self._queue.flush(timeout_s)

    def close(self, timeout_s: float | None = 30.0) -> None:
        """Flush queued writes (up to `timeout_s`), stop the writer, release the directory. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if not self._queue.close(timeout_s):
            log.warning("disk cache closed with writes still queued; they are lost (a miss after restart)")
        self._state.close()
        self._dir_lock.release()
        _open_tiers.discard(self)


@atexit.register
def _close_open_tiers() -> None:
    for tier in list(_open_tiers):
        tier.close(timeout_s=10.0)
