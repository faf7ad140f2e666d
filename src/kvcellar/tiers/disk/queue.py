"""The disk tier's background writer: a bounded queue of writes, deletions, one thread.

Operations: `WriteQueue.try_reserve` / `unreserve` (room for one more write,
checked when a store is reserved), `put` (queue a reserved write), `cancel`
(take queued, unstarted writes back: an evicted entry's write never runs),
`delete` (queue file deletions; never refused), `wait_deletes` (until the
deletions queued so far are done), `start`, `flush`, `close`, `depth`.

Ordering invariants (one thread does all file work, so they are simple):
- deletions run before each batch and before each file of a batch: a
  deletion queued before a write (the room evicted for it, or an older
  version of the same key) is done before that write creates its file, so
  the files on disk never exceed the budget that the reservations obey by
  more than the one file being written;
- a batch never holds the same key twice (an older version of a key is
  finished, and deleted if it was dropped meanwhile, before the newer one);
- when idle, and on flush, the handler persists recency (last-used clocks).
Pacing: while the model computes (`defer(True)`), the handler waits before
each file and inside it (`wait_turn`: before each tensor and the fsync, so a
file begun between two requests stops within ~0.5 MB when the next prefill
starts) until the model is idle, or the oldest write in the batch is
MAX_DEFER_S old, or the backlog is pressing: reservations past HIGH_WATER of
the queue's entries or bytes, a write refused for room since the queue last
emptied, or a flush, close or `wait_deletes` waiting. Deletions are never
held back (cheap, and they keep the budget).
Priority: the thread runs at SCHED_IDLE (thread_priority.py) so that work
done between requests yields the cores to a prefill that starts, and it
returns to normal priority while the backlog is pressing, where permitted:
at SCHED_IDLE, under back-to-back prefills it would barely run and the queue
would fill and drop writes. Where SCHED_IDLE cannot be left again the thread
stays at normal priority (`priority` says which). So the backlog is bounded
at HIGH_WATER while the disk keeps up, and writes run during a prefill only
past it.
Requests never wait on this thread: `put` only appends; a full queue is a
refusal at reservation time, which the tier counts as a drop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from typing import Protocol

from kvcellar.tiers.disk.thread_priority import idle_is_reversible, set_current_thread_idle

log = logging.getLogger(__name__)
BATCH_SIZE = 32  # writes per index commit


class WriteHandler(Protocol):
    def delete_files(self, items: list) -> None: ...

    def write_batch(self, jobs: list, wait_turn: Callable[[], None]) -> None:
        """Write `jobs` in order, calling `wait_turn()` before each file it writes and between its pieces."""
        ...

    def sync_recency(self) -> None: ...


# A block written during a prefill slows that prefill by several times the writer's own CPU time
# (mostly the page-cache copy and its writeback: the same work without the data written cost
# nothing; docs/benchmarks.md, disk tier). So writes wait for the model to be
# idle, within these bounds: the oldest queued write waits at most MAX_DEFER_S, and nothing waits once
# reservations pass HIGH_WATER of the queue (1/8 left: a few blocks, more than one prefill chunk stores
# before the writer, then at normal priority, writes a file) or the queue has refused a write.
MAX_DEFER_S = 30.0
HIGH_WATER = 7 / 8


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
        self._num_deletes_queued = 0  # deletions queued so far, and done so far (wait_deletes compares them)
        self._num_deletes_done = 0
        self._num_delete_waiters = 0
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
        self._idle_now = False  # writer thread only: whether it runs at SCHED_IDLE right now
        self._can_idle = False  # writer thread only: SCHED_IDLE may be entered and left here
        self.priority = "normal"  # "sched_idle+normal" once the thread runs where it can switch

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
            if self._pressing():
                self._cond.notify_all()  # a writer waiting for the prefill to end may go now
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

    def cancel(self, jobs: Iterable[object]) -> int:
        """Take these jobs (by identity) out of the queue unstarted and free their room; returns how many.

        A job already taken by the thread is not here: the handler finds it no longer wanted and skips it
        (or deletes its fresh file).
        """
        wanted = {id(job) for job in jobs}
        if not wanted:
            return 0
        with self._cond:
            kept = deque(item for item in self._jobs if id(item[1]) not in wanted)
            for item in self._jobs:
                if id(item[1]) in wanted:
                    self._release(item[2])
            num_cancelled = len(self._jobs) - len(kept)
            self._jobs = kept
            self._cond.notify_all()
            return num_cancelled

    def delete(self, items: list) -> None:
        """Queue file deletions (one wake-up for the whole list)."""
        if items:
            with self._cond:
                self._deletes.extend(items)
                self._num_deletes_queued += len(items)
                self._cond.notify_all()

    def wait_deletes(self, timeout_s: float | None = None) -> bool:
        """Wait until every deletion queued so far is done (the writer runs them first, at normal priority)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            target = self._num_deletes_queued
            if self._thread is None or not self._thread.is_alive():  # not started, or closed: the caller does them
                self._run_deletes_locked()
                return True
            self._num_delete_waiters += 1
            self._cond.notify_all()
            try:
                while self._num_deletes_done < target:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    self._cond.wait(left)
                return True
            finally:
                self._num_delete_waiters -= 1

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

    def _take(self) -> tuple[list[tuple[Hashable, object, int, float]], int | None] | None:
        """Under the lock: wait for work; None when stopping with nothing left. Deletions are the caller's first."""
        idle = False
        while not (self._deletes or self._jobs or self._sync_done < self._sync_asked or self._stopping or idle):
            idle = not self._cond.wait(self._sync_interval_s)  # idle for a while: persist recency
        if self._stopping and not (self._deletes or self._jobs or self._sync_done < self._sync_asked):
            return None
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
        return batch, sync_to

    def _pressing(self) -> bool:
        """Under the lock: the backlog must be written now, during a prefill and at normal priority."""
        return (
            self._stopping
            or self._sync_done < self._sync_asked
            or self._num_delete_waiters > 0
            or self._out_of_room
            or self._num_reserved >= HIGH_WATER * self.max_entries
            or self._reserved_bytes >= HIGH_WATER * self.max_bytes
        )

    def _run_deletes_locked(self) -> None:
        """Under the lock, released around the file work: perform every deletion queued so far."""
        while self._deletes:
            deletes, self._deletes = self._deletes, []
            self._cond.release()
            try:
                self._handler.delete_files(deletes)
            except Exception:  # the thread must survive; a file left behind is reconciled at start-up
                log.exception("disk cache deletion failed; continuing")
            finally:
                self._cond.acquire()
            self._num_deletes_done += len(deletes)
            self._cond.notify_all()

    def _set_priority(self, pressing: bool) -> None:
        """Writer thread: normal priority while pressing, SCHED_IDLE otherwise (where it can switch back)."""
        if self._can_idle and self._idle_now == pressing:
            self._idle_now = set_current_thread_idle(not pressing) and not pressing

    def _wait_turn(self, deadline: float) -> None:
        """Writer thread, before each file and between its pieces: run deletions, then wait while the model computes."""
        with self._cond:
            while True:
                self._set_priority(self._pressing())
                self._run_deletes_locked()
                left = deadline - time.monotonic()
                if not self._model_busy or self._pressing() or left <= 0:
                    break
                self._cond.wait(left)
            self._set_priority(self._pressing())

    def _loop(self) -> None:
        self._can_idle = idle_is_reversible()
        self.priority = "sched_idle+normal" if self._can_idle else "normal"
        while True:
            with self._cond:
                taken = self._take()
                if taken is None:
                    return
                self._set_priority(self._pressing())
                self._run_deletes_locked()
            batch, sync_to = taken
            try:
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
