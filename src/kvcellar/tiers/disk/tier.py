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
Budget: entry files + index + WAL stay within the budget, beyond the one file
being written (disk_state.py); a disk that fills first (ENOSPC) lowers the
effective budget to what it held and evicts to fit; `set_budget` returns
once the evicted files are deleted.
Threads: the tier's lock guards the catalog (shared with the writer thread),
never file I/O. The directory is flock'ed while open: one process at a time.
Close, or interpreter exit, flushes the queue.
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
from kvcellar.tiers.disk.catalog import QUEUED, RESERVED, STORED, Catalog, Record
from kvcellar.tiers.disk.codec import PayloadCodec
from kvcellar.tiers.disk import state as disk_state
from kvcellar.tiers.disk.state import INDEX_SLACK_BYTES, DiskState
from kvcellar.tiers.disk.writer import DiskWriter
from kvcellar.tiers.disk.entry_io import ReadFailure, plan_header
from kvcellar.tiers.disk.files import CacheDir, DirLock, quarantine
from kvcellar.tiers.disk.format import DEFAULT_CHECKSUM
from kvcellar.tiers.disk.index import DiskIndex
from kvcellar.tiers.disk.recovery import recover
from kvcellar.tiers.disk.queue import WriteQueue

__all__ = ["DiskTier", "clear_disk_cache", "disk_cache_stats", "list_disk_entries"]
log = logging.getLogger(__name__)
_open_tiers: weakref.WeakSet[DiskTier] = weakref.WeakSet()


class DiskTier:
    name = "disk"

    def __init__(self, cache_dir: str | Path, budget_bytes: int, codec: PayloadCodec, *, policy: str = DEFAULT_EVICTION_POLICY,
                 max_queue_entries: int = 256, max_queue_bytes: int = 1 << 30, checksum: str = DEFAULT_CHECKSUM,
                 start_writer: bool = True) -> None:  # fmt: skip
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
            state = DiskState(folder, codec, catalog, index, DiskIndex(folder.index_path), limit_bytes=budget_bytes)
            state.measure_index()
        except BaseException:
            self._dir_lock.release()
            raise
        self._s = state
        # Aliases of the shared state (never rebound): the request side's view.
        self._dir, self._codec, self._catalog = folder, codec, state.catalog
        self._lock, self._counters = state.lock, state.counters
        self._budget_bytes = budget_bytes
        self._checksum = checksum
        self._queue = WriteQueue(DiskWriter(state, self._disk_full, self._regain_space), max_queue_entries, max_queue_bytes)
        self._closed = False
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
        return self._budget_bytes

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
            stored = [r for r in self._catalog if r.state == STORED and not r.is_partial and r.namespace == namespace]
            return max(stored, key=lambda r: r.last_used).key if stored else None

    def entries(self) -> list[CacheEntry]:
        with self._lock:
            return self._metadata([r for r in self._catalog if r.state != RESERVED])

    def _metadata(self, records: list[Record]) -> list[CacheEntry]:
        """Entries of `records`; a record whose token ids cannot be read is dropped (counted). Under the lock."""
        entries, unreadable = self._s.metadata_entries(records)
        if unreadable:
            self._counters["num_bad_rows"] += len(unreadable)
            log.warning("disk cache: %d index rows without usable token ids dropped (first %s)", len(unreadable),
                        unreadable[0].key.hex()[:16])  # fmt: skip
            self._drop(*unreadable)
        return entries

    # -- load --------------------------------------------------------------------------------

    def prepare_load(self, keys: Iterable[BlockHash]) -> list[CacheEntry]:
        """Read and verify each entry; pins cover only the read (so `complete_load` is a no-op)."""
        with self._lock:
            records = [self._catalog.visible(key) for key in keys]
            if any(record is None for record in records):
                raise KeyError("the disk tier no longer holds an entry; look it up again")
            queued = {r.key: r.entry for r in records if r.state != STORED}
            self._counters["num_loads_from_queue"] += len(queued)
            for record in records:
                record.num_pins += 1
                self._catalog.touch(record)
                self._s.dirty.add(record.key)
        loaded, failure = [], None
        try:
            for record in records:
                if record.key in queued:  # not written yet: served from the queued payload
                    loaded.append(queued[record.key].copy_for_tier())
                    continue
                try:
                    loaded.append(self._s.read(record))
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
        self._counters[f"num_{failure.kind}"] += 1  # num_corrupt / num_missing / num_unreadable
        log.warning("disk cache entry %s not served (%s: %s)", record.key.hex()[:16], failure.kind, failure)
        if self._catalog.get(record.key) is record:
            path = self._dir.entry_path(record.namespace, record.key)
            if failure.kind == "corrupt" and quarantine(self._dir, path, str(failure)):
                self._counters["num_quarantined"] += 1
            self._drop(record)

    def _row_disagrees(self, record: Record, failure: ReadFailure) -> None:
        """The file passed its own checks but its row says otherwise: a miss now, the row re-derived from the file.

        The lookup that chose this record used the row's values, so this load is not served. The
        record is dropped and the verified entry stored again (rewritten, then indexed from what it
        is), unless that store is refused (a counted drop, like any store).
        """
        self._counters["num_bad_rows"] += 1
        log.warning("disk cache entry %s: its index row disagrees with its valid file (%s); re-indexed from the file",
                    record.key.hex()[:16], failure)  # fmt: skip
        if self._catalog.get(record.key) is record:
            self._drop(record)
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
            if existing is not None and existing.state == STORED:
                self._metadata([existing])  # one whose token ids cannot be read is dropped: it must not block this store
                existing = self._catalog.get(entry.key)
            if existing is not None:
                supersedes = entry.has_logits and not existing.has_logits and existing.state != RESERVED
                if not supersedes:
                    self._catalog.touch(existing, entry.priority)
                    self._s.dirty.add(entry.key)
                    return StoreResult(True, (), "already stored")
                self._drop(existing)  # the same tail with logits replaces it
            try:
                header = plan_header(entry, self._codec, self._checksum)
            except (ValueError, TypeError, AttributeError) as exc:
                return self._refused("num_refused_payload", f"cannot store this payload on disk: {exc}")
            size, files_budget = header.file_size, self._s.files_budget()
            if size > files_budget:
                too_large = (f"entry of {size} bytes exceeds the disk budget of {self._s.limit_bytes} bytes "
                             f"less the index's {self._s.index_bytes + INDEX_SLACK_BYTES}")  # fmt: skip
                return self._refused("num_refused_too_large", too_large)
            if not self._queue.try_reserve(size):
                entries, queued = self._queue.depth
                return self._refused("num_dropped_queue_full", f"disk write queue full ({entries} entries, {queued} bytes)")
            victims = self._catalog.plan_evictions(self._catalog.num_bytes + size - files_budget, entry.parent)
            if victims is None:
                self._queue.unreserve(size)
                no_room = f"cannot free {size} bytes on disk: the rest is queued, pinned or parents"
                return self._refused("num_dropped_no_room", no_room)
            evicted = self._evict_records(victims)
            record = Record(entry.key, entry.parent, header.namespace, size, sum(s.num_bytes for s in header.tensors),
                            entry.priority, self._catalog.tick(), entry.num_tokens, entry.is_partial, entry.has_logits,
                            state=RESERVED, entry=entry, header=header)  # fmt: skip
            self._catalog.add(record)
            return StoreResult(True, evicted)

    def _refused(self, counter: str, reason: str) -> StoreResult:
        self._counters[counter] += 1
        return StoreResult(False, (), reason)

    def complete_store(self, key: BlockHash) -> None:
        with self._lock:
            record = self._catalog.get(key)
            if record is None:
                raise KeyError(f"the disk tier has no reservation for {key.hex()}; call prepare_store first")
            if record.state == RESERVED:
                self._catalog.publish(record)
                self._queue.put(key, record, record.num_bytes)

    def abort_store(self, key: BlockHash) -> None:
        with self._lock:
            record = self._catalog.get(key)
            if record is not None and record.state == RESERVED:
                self._catalog.remove(record)
                self._queue.unreserve(record.num_bytes)

    # -- bookkeeping -------------------------------------------------------------------------

    def touch(self, keys: Iterable[BlockHash]) -> None:
        with self._lock:
            for key in keys:
                record = self._catalog.visible(key)
                if record is not None:
                    self._catalog.touch(record)
                    self._s.dirty.add(key)

    def evict(self, key: BlockHash) -> CacheEntry | None:
        """Remove exactly this entry (even pinned or a parent); its file goes on the writer thread."""
        with self._lock:
            record = self._catalog.visible(key)
            return self._evict_records([record], counted=False)[0] if record is not None else None

    def set_budget(self, budget_bytes: int) -> tuple[CacheEntry, ...]:
        """Change the budget (also the effective one, if ENOSPC lowered it), evicting leaves at once.

        Returns once the evicted files are deleted: on return, the files on disk fit the new budget,
        beyond the one file being written.
        """
        check_budget(budget_bytes)
        for attempt in range(2):
            with self._lock:
                previous, self._s.limit_bytes = self._s.limit_bytes, budget_bytes
                victims = self._catalog.plan_evictions(self._catalog.num_bytes - self._s.files_budget(), None)
                if victims is not None:
                    self._budget_bytes = budget_bytes
                    evicted = self._evict_records(victims)
                else:
                    self._s.limit_bytes = previous
            if victims is not None:
                self._queue.wait_deletes()
                return evicted
            if attempt == 0:
                self.flush()
        raise ValueError(f"cannot lower the disk budget to {budget_bytes} bytes while pinned entries hold more; retry")

    def _disk_full(self) -> None:
        """Writer thread, after ENOSPC: the effective budget becomes what the disk holds now; evict to fit.

        The evicted files are deleted by the writer before its next file (writer.py).
        """
        on_disk = self._s.index.size_bytes()
        with self._lock:
            on_disk += self._stored_bytes()
            if on_disk >= self._s.limit_bytes:
                return  # a lower limit was set meanwhile: nothing to lower
            self._s.limit_bytes = on_disk
            victims = self._catalog.plan_evictions(self._catalog.num_bytes - self._s.files_budget(), None) or []
            self._evict_records(victims)
        log.warning("disk cache: the disk is full; effective budget lowered to %d bytes (of %d), %d entries evicted",
                    on_disk, self._budget_bytes, len(victims))  # fmt: skip

    def _regain_space(self) -> None:
        """Writer thread, when idle: after a full disk, raise the effective budget as space is free again."""
        with self._lock:
            if self._s.limit_bytes >= self._budget_bytes:
                return
        free = disk_state.free_bytes(self._dir.root)
        on_disk = self._s.index.size_bytes()
        with self._lock:
            on_disk += self._stored_bytes()
            regained = min(self._budget_bytes, on_disk + free - INDEX_SLACK_BYTES)
            if regained > self._s.limit_bytes:
                log.info("disk cache: %d bytes free on disk; effective budget raised to %d bytes", free, regained)
                self._s.limit_bytes = regained

    def _stored_bytes(self) -> int:
        """Bytes of the entry files on disk now (queued entries have none yet). Under the lock."""
        return sum(r.num_bytes for r in self._catalog if r.state == STORED)

    def clear(self) -> None:
        """Remove every visible entry (files deleted on the writer thread); reservations stay."""
        with self._lock:
            self._drop(*(record for record in self._catalog if record.state != RESERVED))

    def _evict_records(self, records: list[Record], counted: bool = True) -> tuple[CacheEntry, ...]:
        entries, _ = self._s.metadata_entries(records)  # read token ids before the rows go
        self._drop(*records)
        self._counters["num_evictions"] += len(records) if counted else 0
        return tuple(entries)

    def _drop(self, *records: Record) -> None:
        """Forget visible records; stored ones' files and rows are deleted by the writer.

        A queued record's write is cancelled; one the writer has already taken is skipped by it (or
        its fresh file deleted right after).
        """
        for record in records:
            self._catalog.remove(record)
            self._s.dirty.discard(record.key)
        self._counters["num_writes_cancelled"] += self._queue.cancel(r for r in records if r.state == QUEUED)
        self._queue.delete([(r.key, r.namespace) for r in records if r.state == STORED])

    # -- reporting and life cycle ------------------------------------------------------------

    def stats(self) -> TierStats:
        with self._lock:
            num_entries, num_partial, counts, sizes = self._catalog.usage()
            counters = {**self._recovery, **self._s.counters_snapshot()}
            num_bytes = self._catalog.num_bytes
        counters["num_queued"], counters["queued_bytes"] = self._queue.depth
        counters["open_s"] = self._open_s
        counters["index_bytes"] = self._s.index.size_bytes()
        return TierStats(self.name, num_entries, num_partial, num_bytes, self._budget_bytes, counts, sizes, counters)

    def usage_of(self, namespaces: Collection[BlockHash]) -> TierStats:
        """Occupancy by the visible entries of `namespaces` only, from the catalog (the index is not read)."""
        with self._lock:
            records = [r for r in self._catalog if r.state != RESERVED and r.namespace in namespaces]
        counts = {priority.name: 0 for priority in Priority}
        sizes = dict(counts)
        for record in records:
            counts[record.priority.name] += 1
            sizes[record.priority.name] += record.payload_bytes
        return TierStats(self.name, len(records), sum(r.is_partial for r in records), sum(r.num_bytes for r in records),
                         self._budget_bytes, counts, sizes)  # fmt: skip

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
        with self._lock:
            self._s.closed = True
            self._s.reader.close()
        self._s.index.close()
        self._dir_lock.release()
        _open_tiers.discard(self)


@atexit.register
def _close_open_tiers() -> None:
    for tier in list(_open_tiers):
        tier.close(timeout_s=10.0)
