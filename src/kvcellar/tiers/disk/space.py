"""The disk tier's budget and evictions: what may stay on disk, and the removal of what may not.

Operations: `DiskSpace.budget_bytes` (the configured budget), `set_budget`,
`evict_for` (make room for one file, evicting leaves in policy order),
`evict` (remove given records, returning their entries), `drop` (forget
records: queued writes cancelled, stored files deleted on the writer
thread), `disk_full` and `regain_space` (the writer thread's calls after
ENOSPC and when idle).

Budget: entry files + index + WAL stay within the effective limit
(state.py), beyond the one file being written. A disk that fills first
(ENOSPC) lowers the limit to what it held and evicts to fit; as the
filesystem reports free space again, the limit rises back (never past the
configured budget). `set_budget` returns once the evicted files are deleted.
Threads: every catalog change here runs under the state's lock; file
deletions are the writer thread's (queue.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from kvcellar.cache import CacheEntry
from kvcellar.cache.tier import check_budget
from kvcellar.tiers.disk import state as disk_state
from kvcellar.tiers.disk.catalog import Record, RecordState
from kvcellar.tiers.disk.queue import WriteQueue
from kvcellar.tiers.disk.state import INDEX_SLACK_BYTES, DiskState

log = logging.getLogger(__name__)


class DiskSpace:
    def __init__(self, state: DiskState, queue: WriteQueue, budget_bytes: int) -> None:
        check_budget(budget_bytes)
        self._state = state
        self._catalog = state.catalog
        self._queue = queue
        self._budget_bytes = budget_bytes

    @property
    def budget_bytes(self) -> int:
        return self._budget_bytes

    def evict_for(self, num_bytes: int, protected: bytes) -> tuple[CacheEntry, ...] | None:
        """Evict leaves until a file of `num_bytes` fits beside the others; None: impossible, nothing evicted.

        Under the lock. `protected` (the new entry's parent) is never a victim.
        """
        num_needed = self._catalog.num_bytes + num_bytes - self._state.files_budget()
        victims = self._catalog.plan_evictions(num_needed, protected)
        return None if victims is None else self.evict(victims)

    def set_budget(self, budget_bytes: int, flush: Callable[[], bool]) -> tuple[CacheEntry, ...]:
        """Change the budget (also the effective one, if ENOSPC lowered it), evicting leaves at once.

        Returns once the evicted files are deleted: on return, the files on disk fit the new budget,
        beyond the one file being written. Pinned entries that hold more than it: `flush()` (the
        tier's, a no-op once closed) runs once, so queued records become evictable, then ValueError.
        """
        check_budget(budget_bytes)
        state = self._state
        for attempt in range(2):
            with state.lock:
                previous = state.limit_bytes
                state.set_limit(budget_bytes)
                victims = self._catalog.plan_evictions(self._catalog.num_bytes - state.files_budget(), None)
                if victims is not None:
                    self._budget_bytes = budget_bytes
                    evicted = self.evict(victims)
                else:
                    state.set_limit(previous)
            if victims is not None:
                self._queue.wait_deletes()
                return evicted
            if attempt == 0:
                flush()
        raise ValueError(f"cannot lower the disk budget to {budget_bytes} bytes while pinned entries hold more; retry")

    def evict(self, records: list[Record], counted: bool = True) -> tuple[CacheEntry, ...]:
        """Remove `records`, returning their entries (without payload). Under the lock."""
        entries, _ = self._state.metadata_entries(records)  # read token ids before the rows go
        self.drop(*records)
        self._state.count("num_evictions", len(records) if counted else 0)
        return tuple(entries)

    def drop(self, *records: Record) -> None:
        """Forget visible records; stored ones' files and rows are deleted by the writer. Under the lock.

        A queued record's write is cancelled; one the writer has already taken is skipped by it (or
        its fresh file deleted right after).
        """
        for record in records:
            self._catalog.remove(record)
            self._state.forget_recent(record.key)
        num_cancelled = self._queue.cancel(r for r in records if r.state == RecordState.QUEUED)
        self._state.count("num_writes_cancelled", num_cancelled)
        self._queue.delete([(r.key, r.namespace) for r in records if r.state == RecordState.STORED])

    def disk_full(self) -> None:
        """Writer thread, after ENOSPC: the effective budget becomes what the disk holds now; evict to fit.

        The evicted files are deleted by the writer before its next file (queue.py).
        """
        state = self._state
        on_disk = state.index.size_bytes()
        with state.lock:
            on_disk += self._stored_bytes()
            if on_disk >= state.limit_bytes:
                return  # a lower limit was set meanwhile: nothing to lower
            state.set_limit(on_disk)
            victims = self._catalog.plan_evictions(self._catalog.num_bytes - state.files_budget(), None) or []
            self.evict(victims)
        log.warning("disk cache: the disk is full; effective budget lowered to %d bytes (of %d), %d entries evicted",
                    on_disk, self._budget_bytes, len(victims))  # fmt: skip

    def regain_space(self) -> None:
        """Writer thread, when idle: after a full disk, raise the effective budget as space is free again."""
        state = self._state
        with state.lock:
            if state.limit_bytes >= self._budget_bytes:
                return
        free = disk_state.free_bytes(state.folder.root)
        on_disk = state.index.size_bytes()
        with state.lock:
            on_disk += self._stored_bytes()
            regained = min(self._budget_bytes, on_disk + free - INDEX_SLACK_BYTES)
            if regained > state.limit_bytes:
                log.info("disk cache: %d bytes free on disk; effective budget raised to %d bytes", free, regained)
                state.set_limit(regained)

    def _stored_bytes(self) -> int:
        """Bytes of the entry files on disk now (queued entries have none yet). Under the lock."""
        return sum(r.num_bytes for r in self._catalog if r.state == RecordState.STORED)
