"""The model's own thread: requests queue here, and its scheduler runs them together (engine/scheduler.py).

Operations: `ModelWorker.submit(request) -> Job`, `Job` (iterate its events;
`cancel()` stops it at the next scheduler step), `ModelWorker.close()` (after the queued requests).
Invariant: only the worker thread touches the model and the live caches, so
no forward pass ever runs concurrently with another. It also loads the model
and runs every load-time computation (the row-invariance check, compiling
kernels): torch's OpenMP keeps a team of threads per thread that computes,
and a second team, left by compute on another thread, competes with the
worker's for the cores.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future

from kvcellar.engine.request import GenerationRequest, GenerationResult, StreamEvent
from kvcellar.engine.scheduler import Scheduler

log = logging.getLogger(__name__)
_STOP = object()


class Job:
    """One queued request; its events arrive on a private queue, an exception ends the stream."""

    def __init__(self, request: GenerationRequest, job_id: int) -> None:
        self.request = request
        self.job_id = job_id
        self.queued_at = time.perf_counter()  # Timings.queue_s runs from here to the worker taking the job
        self._events: queue.Queue[StreamEvent | BaseException] = queue.Queue()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    def is_cancelled(self) -> bool:
        return self._cancelled.is_set()

    def put(self, item: StreamEvent | BaseException) -> None:
        self._events.put(item)

    def __iter__(self) -> Iterator[StreamEvent]:
        while True:
            item = self._events.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.result is not None:
                return

    def result(self) -> GenerationResult:
        for event in self:
            if event.result is not None:
                return event.result
        raise RuntimeError("the stream ended without a result")


class GenerationStream:
    """The events of one request. Iterate it; `cancel()` may be called from any thread, at any time.

    A request cancelled while still queued never reaches the model; a running
    one stops at its next chunk or token. Closing the stream cancels it too.
    """

    def __init__(self, job: Job) -> None:
        self._job = job
        self._events = iter(job)

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> StreamEvent:
        return next(self._events)

    def cancel(self) -> None:
        self._job.cancel()

    close = cancel

    def __del__(self) -> None:
        self._job.cancel()  # a stream nobody reads any more must not keep the model busy


class ModelWorker:
    """Starts the model's thread, which runs `set_up` (load the model, build its scheduler) and then the
    requests; the constructor returns once `set_up` did, or raises what it raised."""

    def __init__(self, set_up: Callable[[], Scheduler]) -> None:
        self._jobs: queue.Queue[Job | object] = queue.Queue()
        self._ids = itertools.count(1)
        ready: Future[Scheduler] = Future()
        # Handed over through an attribute the thread clears: `set_up` may hold its engine, which must stay
        # collectable (its finalizer closes this worker).
        self._set_up: Callable[[], Scheduler] | None = set_up
        self._thread = threading.Thread(target=self._start, args=(ready,), name="kvcellar-model", daemon=True)
        self._thread.start()
        self.scheduler = ready.result()
        self.runner = self.scheduler.runner

    def _start(self, ready: Future[Scheduler]) -> None:
        set_up, self._set_up = self._set_up, None
        try:
            scheduler = set_up()
        except BaseException as exc:  # the caller's constructor raises it
            ready.set_exception(exc)
            return
        finally:
            del set_up
        self.scheduler = scheduler
        ready.set_result(scheduler)
        self._loop()

    @property
    def queue_depth(self) -> int:
        """Requests not running: queued here, or waiting in the scheduler (for memory, or preempted)."""
        return self._jobs.qsize() + self.scheduler.load().waiting

    def submit(self, request: GenerationRequest) -> Job:
        # The prompt was checked when it was prepared (Engine.prepare), in the caller's thread.
        job = Job(request, next(self._ids))
        self._jobs.put(job)
        return job

    def _loop(self) -> None:
        runner = self.scheduler.runner
        try:
            runner.time_prefill()  # on this thread: torch compute elsewhere would start a second thread pool
        except Exception:  # a failed measurement only leaves the cost model unprimed
            log.exception("the start-up prefill measurement failed; the cost model learns from requests instead")
        self.scheduler.run(self._jobs, _STOP)
        if runner.threads is not None:
            runner.threads.close()

    def close(self, timeout_s: float = 30.0) -> None:
        self._jobs.put(_STOP)
        self._thread.join(timeout_s)
