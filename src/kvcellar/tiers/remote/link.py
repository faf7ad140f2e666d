"""The connection to the shared server and its state: up, or down with a reconnect loop behind it.

Operations: `RemoteLink.run(work)` (one exchange with the server: its result,
or `RemoteUnavailable` at once while the server is down), `.is_up`,
`.refresh_info` (the server's memory and key counts, for stats),
`.count` / `.counters`, `.close`.

Faults are misses, never errors, and never a wait past the timeout: every
command runs with `timeout_s` (connect, send, read) and no retry. A timeout
or a lost connection marks the link down; while down, `run` raises at once
(no request waits on a dead server) and a background thread pings with
exponential backoff until the server answers. Each change of state is one
log line and a counter. A server that answers with an error (`OOM command
not allowed` under maxmemory, an ACL refusal) is up: that one command
failed (`RemoteRefused`), the caller counts it.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

from kvcellar.tiers.remote.address import RemoteAddress

log = logging.getLogger("kvcellar.remote")
T = TypeVar("T")
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0
INFO_FIELDS = ("used_memory", "maxmemory", "evicted_keys", "keyspace_hits", "keyspace_misses")
# What the remote tier's stats always report (0 until it happens), besides `connected` and `server_*`.
COUNTERS = (
    "num_written", "write_bytes", "write_s", "num_dropped", "num_dropped_unavailable", "num_dropped_queue_full",
    "num_refused_payload", "num_oom", "num_refused", "num_chain_lookups", "num_loads", "load_bytes", "load_s",
    "num_missing", "num_corrupt", "num_bad_records", "num_timeouts", "num_connection_errors", "num_reconnects",
)  # fmt: skip


class RemoteUnavailable(Exception):
    """The server cannot be reached now (down, timed out, connection lost): the caller's answer is a miss."""


class RemoteRefused(Exception):
    """The server answered with an error (OOM under maxmemory, an ACL refusal): that command failed."""


class RemoteLink:
    def __init__(self, address: RemoteAddress, timeout_s: float) -> None:
        import redis  # imported here: only a server with a remote tier needs redis-py

        self._errors = redis.exceptions
        self.address = address
        self.timeout_s = timeout_s
        self._client = address.client(timeout_s)
        self._lock = threading.Lock()
        self._counters: Counter[str] = Counter()
        self._info: dict[str, int] = {}
        self._up = False
        self._closed = threading.Event()
        self._reconnecting: threading.Thread | None = None
        try:
            self._client.ping()
            self._up = True
            log.info("remote cache %s reachable", address.display)
        except (self._errors.RedisError, OSError) as exc:
            self._down(exc, at_start=True)

    @property
    def is_up(self) -> bool:
        return self._up

    def run(self, work: Callable[[object], T]) -> T:
        """`work(client)`'s result; RemoteUnavailable (the link goes down) or RemoteRefused otherwise."""
        if not self._up:
            raise RemoteUnavailable(f"remote cache {self.address.display} is unreachable")
        try:
            return work(self._client)
        except self._errors.ResponseError as exc:
            self.count_refusal(exc)
            raise RemoteRefused(str(exc)) from None
        except (self._errors.RedisError, OSError) as exc:
            self._down(exc)
            raise RemoteUnavailable(str(exc)) from None

    def count_refusal(self, error: Exception) -> None:
        """Count a command the server refused: `num_oom` (over maxmemory under noeviction) or `num_refused`."""
        out_of_memory = isinstance(error, self._errors.OutOfMemoryError) or str(error).startswith("OOM")
        self.count("num_oom" if out_of_memory else "num_refused")

    def count(self, name: str, amount: float = 1) -> None:
        with self._lock:
            self._counters[name] += amount

    def counters(self) -> dict[str, float]:
        with self._lock:
            counters = {name: float(self._counters[name]) for name in (*COUNTERS, *self._counters)}
            info = dict(self._info)
        counters["connected"] = float(self._up)
        counters.update({f"server_{name}": float(value) for name, value in info.items()})
        return counters

    def refresh_info(self) -> None:
        """Read the server's memory, eviction and hit counts (INFO); silent while down."""
        def read(client) -> dict[str, int]:
            info = client.info("memory") | client.info("stats")
            return {name: int(info[name]) for name in INFO_FIELDS if name in info} | {"keys": int(client.dbsize())}

        try:
            found = self.run(read)
        except (RemoteUnavailable, RemoteRefused):
            return
        with self._lock:
            self._info = found

    def _down(self, error: BaseException, at_start: bool = False) -> None:
        with self._lock:
            was_up, self._up = self._up, False
            if isinstance(error, self._errors.TimeoutError):
                self._counters["num_timeouts"] += 1
            else:
                self._counters["num_connection_errors"] += 1
            start = (was_up or at_start) and self._reconnecting is None and not self._closed.is_set()
            if start:
                self._reconnecting = threading.Thread(target=self._reconnect, name="kvcellar-remote-reconnect",
                                                      daemon=True)  # fmt: skip
        if was_up or at_start:
            log.warning("remote cache %s unreachable (%s); serving without it, retrying in the background",
                        self.address.display, error)  # fmt: skip
        if start:
            self._reconnecting.start()

    def _reconnect(self) -> None:
        delay = BACKOFF_FIRST_S
        while not self._closed.wait(delay):
            try:
                self._client.ping()
            except (self._errors.RedisError, OSError):
                delay = min(delay * 2, BACKOFF_MAX_S)
                continue
            with self._lock:
                self._up = True
                self._reconnecting = None
                self._counters["num_reconnects"] += 1
            log.warning("remote cache %s reachable again", self.address.display)
            return
        with self._lock:
            self._reconnecting = None

    def close(self) -> None:
        self._closed.set()
        thread = self._reconnecting
        if thread is not None:
            thread.join(timeout=BACKOFF_MAX_S + self.timeout_s)
        self._client.close()
