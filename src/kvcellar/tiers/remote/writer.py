"""Stores to the shared server, behind the request path: a bounded queue and one thread.

Operations: `RemoteWriter.reserve` (room in the queue for one entry, or
why not: the caller counts the drop) / `.unreserve`, `.put` (queue a reserved entry),
`.pending` (an entry queued, not written yet: loads are served from it),
`.delete` (unlink entries and their records), `.clear` (every name under the
prefix), `.defer` (hold writes while the model computes a prefill), `.flush`,
`.close` (drain within a time bound; what is left is dropped, counted).

The thread writes in batches, one pipelined round trip for the entries'
bytes (SET) and one for the records of those the server accepted (HSET),
so a record never names an entry the server refused. Between batches, and
every `INFO_INTERVAL_S` when idle, it reads the server's memory counters.
While the link is down, queued entries are dropped (counted): a write is
never retried past the moment it was due.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from kvcellar.cache.entry import CacheEntry
from kvcellar.tiers.blob import encode_entry
from kvcellar.tiers.codec import PayloadCodec
from kvcellar.tiers.format import EntryHeader
from kvcellar.tiers.remote.link import RemoteLink, RemoteRefused, RemoteUnavailable
from kvcellar.tiers.remote.records import children_key, encode_meta, entry_key

BATCH_BYTES = 64 << 20  # one round trip's worth of entry bytes
INFO_INTERVAL_S = 2.0
_SCAN_COUNT = 1000


@dataclass
class _Store:
    entry: CacheEntry
    header: EntryHeader
    queued: bool = False


class RemoteWriter:
    def __init__(self, link: RemoteLink, codec: PayloadCodec, prefix: str, max_queue_bytes: int) -> None:
        self._link = link
        self._codec = codec
        self._prefix = prefix
        self._max_bytes = max_queue_bytes
        self._stores: OrderedDict[bytes, _Store] = OrderedDict()  # reserved and queued, in queue order
        self._deletes: list[tuple[bytes, bytes | None]] = []  # (key, parent or None)
        self._clear = False
        self._num_bytes = 0  # reserved + queued entry bytes
        self._in_flight = 0  # entries the thread took and has not finished
        self._deferred = False
        self._closing = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="kvcellar-remote-writer", daemon=True)
        self._thread.start()

    # -- the request side --------------------------------------------------------------------

    def reserve(self, entry: CacheEntry, header: EntryHeader) -> str:
        """"" when queued room was reserved for `entry`, else why not (the caller counts the drop)."""
        size = header.file_size
        with self._changed:
            if self._closing:
                return "the remote tier is closed"
            if entry.key in self._stores:
                return ""
            if self._num_bytes + size > self._max_bytes:
                return f"remote write queue full ({len(self._stores)} entries, {self._num_bytes} bytes)"
            self._stores[entry.key] = _Store(entry, header)
            self._num_bytes += size
            return ""

    def unreserve(self, key: bytes) -> None:
        with self._changed:
            store = self._stores.get(key)
            if store is not None and not store.queued:
                self._forget(key)

    def put(self, key: bytes) -> None:
        with self._changed:
            store = self._stores.get(key)
            if store is not None:
                store.queued = True
                self._changed.notify_all()

    def pending(self, key: bytes) -> CacheEntry | None:
        with self._changed:
            store = self._stores.get(key)
            return store.entry if store is not None and store.queued else None

    def delete(self, key: bytes, parent: bytes | None) -> None:
        with self._changed:
            if key in self._stores:
                self._forget(key)
            self._deletes.append((key, parent))
            self._changed.notify_all()

    def clear(self) -> None:
        with self._changed:
            for key in [key for key, store in self._stores.items() if store.queued]:
                self._forget(key)
            self._deletes.clear()
            self._clear = True
            self._changed.notify_all()

    def defer(self, active: bool) -> None:
        with self._changed:
            self._deferred = active
            self._changed.notify_all()

    @property
    def depth(self) -> tuple[int, int]:
        """(entries, bytes) queued or reserved."""
        with self._changed:
            return len(self._stores), self._num_bytes

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued store and deletion was sent (or dropped); False if `timeout_s` passed first."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._changed:
            self._changed.notify_all()
            while self._has_work() or self._in_flight:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._changed.wait(left if left is None else min(left, 0.1))
            return True

    def close(self, timeout_s: float | None) -> bool:
        """Drain for up to `timeout_s` (deferral lifted), then stop; False if writes were left (dropped)."""
        with self._changed:
            self._deferred = False
            self._changed.notify_all()
        drained = self.flush(timeout_s)
        with self._changed:
            self._closing = True
            left = [key for key, store in self._stores.items() if store.queued]
            for key in left:
                self._forget(key)
            self._changed.notify_all()
        if left:
            self._link.count("num_dropped", len(left))
        self._thread.join(timeout=5.0)
        return drained and not left

    # -- the thread --------------------------------------------------------------------------

    def _forget(self, key: bytes) -> None:  # under the condition
        store = self._stores.pop(key)
        self._num_bytes -= store.header.file_size

    def _has_work(self) -> bool:  # under the condition
        return self._clear or bool(self._deletes) or any(store.queued for store in self._stores.values())

    def _run(self) -> None:
        last_info = 0.0
        while True:
            with self._changed:
                while not self._closing and (self._deferred or not self._has_work()):
                    if time.monotonic() - last_info >= INFO_INTERVAL_S:
                        break
                    self._changed.wait(INFO_INTERVAL_S)
                if self._closing:
                    return
                work = None if self._deferred else self._take()
            if work is None:
                self._link.refresh_info()
                last_info = time.monotonic()
                continue
            try:
                self._send(*work)
            finally:
                with self._changed:
                    for key, _ in work[2]:
                        if key in self._stores and self._stores[key].queued:
                            self._forget(key)
                    self._in_flight = 0
                    self._changed.notify_all()

    def _take(self) -> tuple[bool, list[tuple[bytes, bytes | None]], list[tuple[bytes, _Store]]] | None:
        """(clear everything first?, deletions, stores) for one batch; None when there is nothing to do."""
        if not self._has_work():
            return None
        clear, deletes = self._clear, self._deletes
        self._clear, self._deletes = False, []
        stores, size = [], 0
        for key, store in self._stores.items():
            if store.queued and (not stores or size + store.header.file_size <= BATCH_BYTES):
                stores.append((key, store))
                size += store.header.file_size
        self._in_flight = len(stores) + len(deletes) + clear
        return clear, deletes, stores

    def _send(self, clear: bool, deletes: list[tuple[bytes, bytes | None]], stores: list[tuple[bytes, _Store]]) -> None:
        try:
            if clear:
                self._link.run(self._clear_prefix)
            if deletes:
                self._link.run(lambda client: self._unlink(client, deletes))
            if stores:
                self._write(stores)
        except RemoteUnavailable:
            self._link.count("num_dropped", len(stores))
            self._link.count("num_dropped_unavailable", len(stores))
        except RemoteRefused:
            pass  # counted by the link; a refused clear or delete leaves entries to the server's LRU

    def _write(self, stores: list[tuple[bytes, _Store]]) -> None:
        started = time.perf_counter()
        blobs = [b"".join(encode_entry(store.header, store.entry.payload, self._codec)) for _, store in stores]

        def set_entries(client) -> list[object]:
            pipe = client.pipeline(transaction=False)
            for (key, _), blob in zip(stores, blobs):
                pipe.set(entry_key(self._prefix, key), blob)
            return pipe.execute(raise_on_error=False)

        results = self._link.run(set_entries)
        written = [(key, store) for (key, store), result in zip(stores, results) if not isinstance(result, Exception)]
        for result in results:
            if isinstance(result, Exception):
                self._link.count_refusal(result)
        records = []
        if written:
            def set_records(client) -> list[object]:
                pipe = client.pipeline(transaction=False)
                for key, store in written:
                    pipe.hset(children_key(self._prefix, store.entry.parent), key.hex(), encode_meta(store.entry))
                return pipe.execute(raise_on_error=False)

            records = self._link.run(set_records)
        num_written = sum(not isinstance(result, Exception) for result in records)
        orphans = [key for (key, _), result in zip(written, records) if isinstance(result, Exception)]
        for result in records:
            if isinstance(result, Exception):
                self._link.count_refusal(result)
        if orphans:  # entries whose records were refused: unreachable, so they must not hold the server's memory
            self._link.run(lambda client: client.unlink(*(entry_key(self._prefix, key) for key in orphans)))
        self._link.count("num_written", num_written)
        sizes = {key: len(blob) for (key, _), blob in zip(stores, blobs)}
        self._link.count("write_bytes", sum(sizes[key] for key, _ in written) - sum(sizes[key] for key in orphans))
        self._link.count("write_s", time.perf_counter() - started)
        self._link.count("num_dropped", len(stores) - num_written)

    def _unlink(self, client, deletes: list[tuple[bytes, bytes | None]]) -> None:
        pipe = client.pipeline(transaction=False)
        for key, parent in deletes:
            pipe.unlink(entry_key(self._prefix, key))
            if parent is not None:
                pipe.hdel(children_key(self._prefix, parent), key.hex())
        pipe.execute(raise_on_error=False)

    def _clear_prefix(self, client) -> None:
        batch = []
        for name in client.scan_iter(match=f"{self._prefix}*".encode(), count=_SCAN_COUNT):
            batch.append(name)
            if len(batch) >= _SCAN_COUNT:
                client.unlink(*batch)
                batch = []
        if batch:
            client.unlink(*batch)
