"""A ZMQ PUB socket that sends KV-event batches from a thread of its own.

Operations: `EventPublisher(endpoint)`: `.publish(event)` (never blocks: the
event joins a bounded queue; past it events are dropped, counted),
`.counters()`, `.flush`, `.close()`, `.pause` (nothing to pause: the
registry treats the publisher as one of its helper threads).

Wire: each batch is a three-frame message `(topic, sequence, payload)`, the
sequence an 8-byte big-endian counter from 0 (a subscriber sees a gap when it
missed batches) and the payload `format.encode_batch`, as vLLM's
`ZmqEventPublisher` sends them. An endpoint with `*` (tcp://*:5557), or an
ipc:// or inproc:// one, is bound; any other is connected to (vLLM's rule).
The thread sends what accumulated every `BATCH_INTERVAL_S`, so one batch
carries the events of many stores.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

from kvcellar.events.format import encode_batch

log = logging.getLogger("kvcellar.events")
BATCH_INTERVAL_S = 0.05
MAX_QUEUED_EVENTS = 100_000
MAX_EVENTS_PER_BATCH = 1024


def binds(endpoint: str) -> bool:
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class EventPublisher:
    def __init__(self, endpoint: str, topic: str = "", data_parallel_rank: int = 0) -> None:
        import zmq  # only a server that publishes events needs pyzmq

        self.endpoint = endpoint
        self._topic = topic.encode()
        self._rank = data_parallel_rank
        self._context = zmq.Context.instance()
        self._socket = self._context.socket(zmq.PUB)
        self._socket.setsockopt(zmq.SNDHWM, 100_000)
        self._socket.setsockopt(zmq.LINGER, 1000)
        try:
            self._socket.bind(endpoint) if binds(endpoint) else self._socket.connect(endpoint)
        except zmq.ZMQError as exc:
            self._socket.close(linger=0)
            raise ValueError(f"cannot open the KV-event endpoint {endpoint!r}: {exc}") from None
        self._queue: list[dict] = []
        self._changed = threading.Condition()
        self._counters: Counter[str] = Counter()
        self._sequence = 0
        self._closing = False
        self._sending = False
        self._thread = threading.Thread(target=self._run, name="kvcellar-kv-events", daemon=True)
        self._thread.start()
        log.info("publishing KV events on %s", endpoint)

    def publish(self, event: dict) -> None:
        with self._changed:
            if self._closing or len(self._queue) >= MAX_QUEUED_EVENTS:
                self._counters["num_events_dropped"] += 1
                return
            self._queue.append(event)
            self._changed.notify()

    def counters(self) -> dict[str, int]:
        with self._changed:
            return {"num_events": self._counters["num_events"], "num_batches": self._counters["num_batches"],
                    "num_events_dropped": self._counters["num_events_dropped"]}  # fmt: skip

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._queue and not self._closing:
                    self._changed.wait()
                if not self._queue and self._closing:
                    return
            if not self._closing:
                threading.Event().wait(BATCH_INTERVAL_S)  # let the events of one request gather into one batch
            with self._changed:
                events, self._queue = self._queue[:MAX_EVENTS_PER_BATCH], self._queue[MAX_EVENTS_PER_BATCH:]
                self._sending = True
            payload = encode_batch(events, self._rank)
            self._socket.send_multipart((self._topic, self._sequence.to_bytes(8, "big"), payload))
            self._sequence += 1
            with self._changed:
                self._counters["num_events"] += len(events)
                self._counters["num_batches"] += 1
                self._sending = False
                self._changed.notify_all()

    def pause(self, active: bool) -> None:
        pass  # sending a batch costs microseconds: nothing to hold back while a request runs

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued event was sent; False if `timeout_s` passed first."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._changed:
            while self._queue or self._sending:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._changed.wait(0.05 if left is None else min(left, 0.05))
            return True

    def close(self) -> None:
        """Send what is queued, then close the socket."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._thread.join(timeout=10.0)
        self._socket.close()
