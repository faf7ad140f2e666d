"""The remote tier: entries shared by every server of a namespace through one Redis or Valkey.

Operations: `RemoteTier` (the `Tier` protocol, plus the `ChainLookup`
ability: `find_chain`; and `BackgroundWriter`: `defer_writes`, a bounded
`close`).

What crosses the network, and when:
- a lookup asks about the rest of its chain once (`find_chain`: one
  pipelined round trip of `HGET`s) and, where it needs them, the children
  of the chain's end (`children`: one `HGETALL`);
- a load fetches its entries' bytes in one pipelined round trip of `GET`s,
  and checks each as the disk tier checks a file (tiers/blob.py): an entry
  that is gone (evicted by the server: `num_missing`) or fails a check
  (`num_corrupt`; its key and record are deleted) is a miss;
- stores are queued and written by a background thread (writer.py);
  `prepare_store` never waits on the server.
`contains`, `get` and `entries` answer from what this process knows (its
own stores and what its questions found: `directory`), never with a round
trip; the cache core asks the server through `find_chain`.

Budget: the server's own `maxmemory` and eviction policy bound the shared
store; `budget_bytes` reports the server's maxmemory (0: unbounded) and
cannot be set from here. `stats` reports what this server wrote, loaded
and lost, and the server's own counters (read in the background).

Faults (link.py): with the server down or slow, every read is a miss after
at most one timeout, and stores are dropped (counted) until it is back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from kvcellar.cache import BlockHash, CacheEntry, Priority, StoreResult, TierStats
from kvcellar.cache.tier import usage_by_priority
from kvcellar.tiers.blob import plan_header, verify_entry
from kvcellar.tiers.codec import PayloadCodec
from kvcellar.tiers.format import DEFAULT_CHECKSUM, FormatError
from kvcellar.tiers.remote.address import RemoteAddress
from kvcellar.tiers.remote.link import RemoteLink, RemoteRefused, RemoteUnavailable
from kvcellar.tiers.remote.records import children_key, decode_meta, encode_meta, entry_key
from kvcellar.tiers.remote.writer import RemoteWriter

log = logging.getLogger("kvcellar.remote")
DIRECTORY_ENTRIES = 1 << 16  # metadata entries this process remembers (about 1.1 KB each at 256-token blocks)


class RemoteTier:
    name = "remote"

    def __init__(self, url: str, codec: PayloadCodec, *, prefix: str = "kvcellar:", timeout_s: float = 0.5,
                 max_queue_bytes: int = 1 << 30, checksum: str = DEFAULT_CHECKSUM) -> None:  # fmt: skip
        """Connect to `url` (a server that is down now is not an error: the tier serves misses meanwhile)."""
        if not isinstance(prefix, str) or not prefix or any(c in prefix for c in "*?[]"):
            raise ValueError(f"the remote key prefix must be a non-empty string without *?[] (got {prefix!r})")
        if not timeout_s > 0:
            raise ValueError(f"the remote timeout must be > 0 seconds (got {timeout_s!r})")
        self.address = RemoteAddress.parse(url)
        self.prefix = prefix
        self._codec = codec
        self._checksum = checksum
        self._link = RemoteLink(self.address, timeout_s)
        self._writer = RemoteWriter(self._link, codec, prefix, max_queue_bytes)
        self._lock = threading.Lock()  # guards the directory
        self._directory: OrderedDict[BlockHash, CacheEntry] = OrderedDict()  # key -> metadata entry, LRU order
        self._closed = False

    # -- what this process knows -------------------------------------------------------------

    @property
    def is_up(self) -> bool:
        return self._link.is_up

    @property
    def budget_bytes(self) -> int:
        return int(self._link.counters().get("server_maxmemory", 0))

    @budget_bytes.setter
    def budget_bytes(self, budget_bytes: int) -> None:
        self.set_budget(budget_bytes)

    @property
    def num_bytes(self) -> int:
        return int(self._link.counters().get("server_used_memory", 0))

    @property
    def num_entries(self) -> int:
        with self._lock:
            return len(self._directory)

    def contains(self, key: BlockHash) -> bool:
        with self._lock:
            return key in self._directory

    def get(self, key: BlockHash) -> CacheEntry | None:
        with self._lock:
            return self._directory.get(key)

    def entries(self) -> list[CacheEntry]:
        with self._lock:
            return list(self._directory.values())

    def _know(self, entries: Iterable[CacheEntry]) -> None:  # under the lock
        for entry in entries:
            self._directory[entry.key] = entry
            self._directory.move_to_end(entry.key)
        while len(self._directory) > DIRECTORY_ENTRIES:
            self._directory.popitem(last=False)

    # -- questions to the server -------------------------------------------------------------

    def find_chain(self, parent: BlockHash, keys: Sequence[BlockHash]) -> int:
        """How many leading `keys` the server holds (one pipelined round trip); 0 while it is unreachable."""
        if not keys:
            return 0

        def ask(client) -> list[object]:
            pipe = client.pipeline(transaction=False)
            for before, key in zip((parent, *keys[:-1]), keys):
                pipe.hget(children_key(self.prefix, before), key.hex())
            return pipe.execute(raise_on_error=False)

        records = self._ask(ask)
        if records is None:
            return 0
        found = []
        for key, record in zip(keys, records):
            entry = self._entry_of(key, record)
            if entry is None or entry.is_tail:
                break
            found.append(entry)
        with self._lock:
            self._know(found)
            if len(found) < len(keys):
                self._directory.pop(keys[len(found)], None)  # the server no longer holds it
        self._link.count("num_chain_lookups")
        return len(found)

    def children(self, parent: BlockHash) -> list[CacheEntry]:
        records = self._ask(lambda client: client.hgetall(children_key(self.prefix, parent)))
        if not records:
            return []
        found = []
        for field, record in records.items():
            try:
                key = bytes.fromhex(field.decode())
            except (ValueError, UnicodeDecodeError):
                continue
            entry = self._entry_of(key, record)
            if entry is not None and entry.parent == parent:
                found.append(entry)
        with self._lock:
            self._know(found)
        return found

    def _ask(self, work):
        """The server's answer, or None (a miss) while it is unreachable or refuses."""
        try:
            return self._link.run(work)
        except (RemoteUnavailable, RemoteRefused):
            return None

    def _entry_of(self, key: BlockHash, record: object) -> CacheEntry | None:
        if not isinstance(record, bytes):
            return None
        try:
            return decode_meta(key, record)
        except ValueError:
            self._link.count("num_bad_records")
            return None

    # -- loads -------------------------------------------------------------------------------

    def prepare_load(self, keys: Iterable[BlockHash]) -> list[CacheEntry]:
        """Fetch and verify every entry (one round trip); KeyError (the entry forgotten) for one gone or bad."""
        keys = list(keys)
        with self._lock:
            known = [self._directory.get(key) for key in keys]
        queued = {key: self._writer.pending(key) for key in keys}
        wanted = [key for key in keys if queued[key] is None]
        started = time.perf_counter()

        def fetch(client) -> list[object]:
            pipe = client.pipeline(transaction=False)
            for key in wanted:
                pipe.get(entry_key(self.prefix, key))
            return pipe.execute(raise_on_error=False)

        try:
            blobs = dict(zip(wanted, self._link.run(fetch))) if wanted else {}
        except (RemoteUnavailable, RemoteRefused) as exc:
            raise KeyError(f"the remote tier cannot load now ({exc})") from None
        loaded = []
        for key, meta in zip(keys, known):
            if queued[key] is not None:  # not written yet: served from the queued payload
                loaded.append(queued[key].copy_for_tier())
                continue
            loaded.append(self._verified(key, meta, blobs[key]))
        self._link.count("num_loads", len(wanted))
        self._link.count("load_bytes", sum(len(blobs[key]) for key in wanted))
        self._link.count("load_s", time.perf_counter() - started)
        return loaded

    def _verified(self, key: BlockHash, meta: CacheEntry | None, blob: object) -> CacheEntry:
        namespace = meta.namespace if meta is not None else None
        if not isinstance(blob, bytes):
            self._link.count("num_missing")  # evicted by the server (or never written): its record goes too
            self._drop(key, meta)
            raise KeyError(f"remote entry {key.hex()} is gone (evicted by the server); it was forgotten")
        try:
            header, payload = verify_entry(blob, self._codec, key=key, namespace=namespace)
        except FormatError as exc:
            self._link.count("num_corrupt")
            log.warning("remote cache entry %s not served (corrupt: %s); deleted", key.hex()[:16], exc)
            self._drop(key, meta)
            raise KeyError(f"remote entry {key.hex()} failed its checks ({exc}); it was deleted") from None
        return CacheEntry(header.key, header.parent, header.token_ids, header.payload_bytes, Priority(header.priority),
                          payload, header.is_tail, header.has_logits, namespace=header.namespace)  # fmt: skip

    def _drop(self, key: BlockHash, meta: CacheEntry | None) -> None:
        with self._lock:
            self._directory.pop(key, None)
        self._writer.delete(key, meta.parent if meta is not None else None)

    def complete_load(self, keys: Iterable[BlockHash]) -> None:
        pass  # the bytes were fetched inside prepare_load: nothing stays pinned

    # -- stores ------------------------------------------------------------------------------

    def prepare_store(self, entry: CacheEntry) -> StoreResult:
        """Reserve room in the write queue (never a round trip); refused while closed, down or full (counted)."""
        if self._closed:
            return StoreResult(False, (), "the remote tier is closed")
        with self._lock:
            existing = self._directory.get(entry.key)
        if existing is not None and not (entry.has_logits and not existing.has_logits):
            return StoreResult(True, (), "already stored")
        if not self._link.is_up:
            return self._refused("num_dropped_unavailable", f"remote cache {self.address.display} is unreachable")
        try:
            header = plan_header(entry, self._codec, self._checksum)
            encode_meta(entry)
        except (ValueError, TypeError, AttributeError) as exc:
            return self._refused("num_refused_payload", f"cannot store this payload remotely: {exc}")
        reason = self._writer.reserve(entry, header)
        if reason:
            return self._refused("num_dropped_queue_full", reason)
        return StoreResult(True)

    def _refused(self, counter: str, reason: str) -> StoreResult:
        self._link.count(counter)
        return StoreResult(False, (), reason)

    def complete_store(self, key: BlockHash) -> None:
        self._writer.put(key)
        entry = self._writer.pending(key)
        if entry is not None:  # visible at once: loads are served from the queue until it is written
            with self._lock:
                self._know([_metadata(entry)])

    def abort_store(self, key: BlockHash) -> None:
        self._writer.unreserve(key)

    # -- bookkeeping -------------------------------------------------------------------------

    def touch(self, keys: Iterable[BlockHash]) -> None:
        pass  # the server's LRU clock moves when a lookup or a load reads the key

    def evict(self, key: BlockHash) -> CacheEntry | None:
        """Delete exactly this entry from the server (in the background); its metadata if this process knew it."""
        with self._lock:
            meta = self._directory.pop(key, None)
        self._writer.delete(key, meta.parent if meta is not None else None)
        return meta

    def set_budget(self, budget_bytes: int) -> tuple[CacheEntry, ...]:
        raise ValueError(
            "the remote tier's size is the Redis/Valkey server's own maxmemory (with maxmemory-policy allkeys-lru); "
            "set it there, e.g. CONFIG SET maxmemory 8gb"
        )

    def clear(self) -> None:
        """Delete every entry under this tier's prefix on the server (every server's: the store is shared)."""
        with self._lock:
            self._directory.clear()
        self._writer.clear()

    def stats(self) -> TierStats:
        num_entries, num_tails, by_count, by_bytes = usage_by_priority(self.entries())
        counters = self._link.counters()
        counters["num_queued"], counters["queued_bytes"] = self._writer.depth
        return TierStats(self.name, num_entries, num_tails, self.num_bytes, self.budget_bytes, by_count, by_bytes,
                         counters)  # fmt: skip

    def defer_writes(self, active: bool) -> None:
        """The engine is (not) computing a prefill: hold background writes back meanwhile."""
        self._writer.defer(active)

    def flush(self, timeout_s: float | None = None) -> bool:
        return True if self._closed else self._writer.flush(timeout_s)

    def close(self, timeout_s: float | None = 30.0) -> None:
        """Send queued writes (up to `timeout_s`), then disconnect. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if not self._writer.close(timeout_s):
            log.warning("remote cache closed with writes still queued; they are lost (a miss for other servers)")
        self._link.close()


def _metadata(entry: CacheEntry) -> CacheEntry:
    """A metadata-only copy of `entry` for the directory (its payload stays with the write queue)."""
    return CacheEntry(entry.key, entry.parent, entry.token_ids, entry.num_bytes, entry.priority, None, entry.is_tail,
                      entry.has_logits, namespace=entry.namespace)  # fmt: skip
