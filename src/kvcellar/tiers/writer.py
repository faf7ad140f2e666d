"""The disk tier's background writer: a bounded queue of writes, deletions, one thread.

Operations: `WriteQueue.try_reserve` / `unreserve` (room for one more write,
checked when a store is reserved), `put` (queue a reserved write), `delete`
(queue a file deletion; never refused), `start`, `flush`, `close`, `depth`.

Ordering invariants (one thread does all file work, so they are simple):
- every pass first performs all deletions queued so far, then writes one
  batch: a deletion queued before a write (the room evicted for it, or an
  older version of the same key) is done before that write creates its file,
  so the files on disk never exceed the budget that the reservations obey;
- a batch never holds the same key twice (an older version of a key is
  finished, and deleted if it was dropped meanwhile, before the newer one);
- when idle, and on flush, the handler persists recency (last-used clocks).
Pacing: while the model computes (`defer(True)`), the handler waits before
each file and inside it (`wait_turn`: before each tensor and the fsync, so
a file begun between two requests stops within ~0.5 MB when the next
prefill starts) until the model is idle, unless the backlog is
urgent: the oldest write in the batch is MAX_DEFER_S old, the queue is full
(all its entries or bytes reserved, or it has refused a write for room since
it last emptied), or a flush/close waits. Deletions and
recency syncs are never held back (cheap, and deletions keep the budget).
The thread also runs at the lowest CPU priority (SCHED_IDLE on Linux,
`priority` says what applied): a file begun between requests, or written
because the backlog is urgent, yields the cores to a prefill that starts.
Requests never wait on this thread: `put` only appends; a full queue is a
refusal at reservation time, which the tier counts as a drop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Protocol

from kvcellar.tiers.thread_priority import lower_current_thread

log = logging.getLogger(__name__)
BATCH_SIZE = 32  # writes per index commit


class WriteHandler(Protocol):
    def delete_files(self, items: list) -> None: ...

    def write_batch(self, jobs: list, wait_turn: Callable[[], None]) -> None:
        """Write `jobs` in order, calling `wait_turn()` before each file it writes and between its pieces."""
        ...

    def sync_recency(self) -> None: ...


# Measured on a 2-core CPU (2 torch threads): each 29 MB block written during a prefill cost the
# prefill ~60 ms, about five times the writer's own CPU time (mostly the page-cache copy and its
# writeback: the same work without the data written cost nothing). So writes wait for the model to be
# idle, within these bounds: the oldest queued write waits at most MAX_DEFER_S, and nothing waits once
# the queue is full or has refused a write (a full queue drops writes).
MAX_DEFER_S = 30.0


class WriteQueue:
    def __init__(self, handler: WriteHandler, max_entries: int, max_bytes: int, sync_interval_s: float = 1.0) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("the disk write queue needs room for at least one entry (max_entries, max_bytes >= 1)")
        self._handler = handler
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._sync_interval_s = sync_interval_s
        self._cond = threading.Condition()
        self._jobs: deque[tuple[Hashable, object, int, float]] = deque()  # (key, job, reserved bytes, queued at)
        self._deletes: list = []
        self._num_reserved = 0  # entries reserved or queued or being written
        self._reserved_bytes = 0
        self._busy = False
        self._sync_asked = 0  # flush requests so far; the thread answers each with a recency sync
        self._sync_done = 0
        self._last_sync = time.monotonic()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._model_busy = False  # set by defer(); guarded by _cond like the rest
        self._out_of_room = False  # a reservation was refused since the queue last emptied
        self.priority = "unchanged"  # what the writer thread lowered itself to (thread_priority.py)

    def defer(self, active: bool) -> None:
        """While `active` (a prefill runs), hold file writes back; requests never wait on this."""
        with self._cond:
            self._model_busy = active
            if not active:
                self._cond.notify_all()

    @property
    def depth(self) -> tuple[int, int]:
        """(entries, bytes) reserved, queued or being written."""
        with self._cond:
            return self._num_reserved, self._reserved_bytes

    def try_reserve(self, num_bytes: int) -> bool:
        with self._cond:
            if self._num_reserved + 1 > self.max_entries or self._reserved_bytes + num_bytes > self.max_bytes:
                # A write was dropped for room: from now on writes may not wait (until the queue empties).
                # Refused with nothing reserved, it is one write larger than the queue: draining cannot help.
                self._out_of_room = self._num_reserved > 0
                self._cond.notify_all()
                return False
            self._num_reserved += 1
            self._reserved_bytes += num_bytes
            return True

    def unreserve(self, num_bytes: int) -> None:
        with self._cond:
            self._release(num_bytes)
            self._cond.notify_all()

    def _release(self, num_bytes: int) -> None:
        """Under the lock: one reservation is done (written, dropped or cancelled)."""
        self._num_reserved -= 1
        self._reserved_bytes -= num_bytes
        if self._num_reserved == 0:  # everything reserved is done: room again
            self._out_of_room = False

    def put(self, key: Hashable, job: object, num_bytes: int) -> None:
        with self._cond:
            self._jobs.append((key, job, num_bytes, time.monotonic()))
            self._cond.notify_all()

    def delete(self, items: list) -> None:
        """Queue file deletions (one wake-up for the whole list)."""
        if items:
            with self._cond:
                self._deletes.extend(items)
                self._cond.notify_all()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="kvcellar-disk-writer", daemon=True)
            self._thread.start()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued write and deletion is done and recency is persisted."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            if self._thread is None:
                return not self._jobs and not self._deletes
            self._sync_asked += 1
            asked = self._sync_asked
            self._cond.notify_all()
            while self._jobs or self._deletes or self._busy or self._sync_done < asked:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self, timeout_s: float | None = None) -> bool:
        flushed = self.flush(timeout_s)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
        return flushed

    def _take(self) -> tuple[list, list[tuple[Hashable, object, int, float]], int | None] | None:
        """Under the lock: wait for work; None when stopping with nothing left."""
        idle = False
        while not (self._deletes or self._jobs or self._sync_done < self._sync_asked or self._stopping or idle):
            idle = not self._cond.wait(self._sync_interval_s)  # idle for a while: persist recency
        if self._stopping and not (self._deletes or self._jobs or self._sync_done < self._sync_asked):
            return None
        deletes, self._deletes = self._deletes, []
        batch: list[tuple[Hashable, object, int, float]] = []
        keys: set[Hashable] = set()
        while self._jobs and len(batch) < BATCH_SIZE and self._jobs[0][0] not in keys:
            item = self._jobs.popleft()
            keys.add(item[0])
            batch.append(item)
        # Sync once the queue is drained (flush, idle), and at least once per interval under load.
        due = self._sync_done < self._sync_asked or idle
        sync_to = self._sync_asked if due and not self._jobs else None
        if sync_to is None and time.monotonic() - self._last_sync >= self._sync_interval_s:
            sync_to = self._sync_done
        self._busy = True
        return deletes, batch, sync_to

    def _urgent(self) -> bool:
        """Under the lock: writes may not wait (flush or close waiting, or the queue full: writes being dropped)."""
        return (
            self._stopping
            or self._sync_done < self._sync_asked
            or self._out_of_room
            or self._num_reserved >= self.max_entries
            or self._reserved_bytes >= self.max_bytes
        )

    def _wait_turn(self, deadline: float) -> None:
        """Writer thread, before each file: wait while the model computes, until `deadline` or urgency."""
        with self._cond:
            while self._model_busy and not self._urgent():
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    def _loop(self) -> None:
        # The lowest CPU priority: file work runs on cores the model leaves idle (thread_priority.py).
        self.priority = lower_current_thread()
        while True:
            with self._cond:
                taken = self._take()
                if taken is None:
                    return
            deletes, batch, sync_to = taken
            try:
                if deletes:
                    self._handler.delete_files(deletes)
                if batch:
                    deadline = batch[0][3] + MAX_DEFER_S  # the batch's oldest write sets its deadline
                    self._handler.write_batch([item[1] for item in batch], lambda: self._wait_turn(deadline))
                if sync_to is not None:
                    self._handler.sync_recency()
            except Exception:  # the thread must survive: a lost write is a miss later, never a crash
                log.exception("disk cache writer failed; continuing")
            with self._cond:
                for _, _, num_bytes, _ in batch:
                    self._release(num_bytes)
                if sync_to is not None:
                    self._last_sync = time.monotonic()
                    self._sync_done = max(self._sync_done, sync_to)
                self._busy = False
                self._cond.notify_all()

