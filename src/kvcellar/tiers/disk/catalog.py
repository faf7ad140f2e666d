"""The disk tier's in-memory view of its entries: records, child links, occupancy, eviction order.

Operations: `Record` (one entry: metadata, state, pins; the payload only
while its write is queued), `Catalog.add` / `remove` / `get` / `visible` /
`children` / `touch` / `stored` / `unpin` / `plan_evictions` / `usage`.

States: RESERVED (bytes counted, not visible) -> QUEUED (visible, served from
the queued payload in memory) -> STORED (file durable and indexed).

Invariants:
- `num_bytes` = file bytes of every record, whatever its state.
- Eviction candidates are visible (QUEUED or STORED), unpinned leaves (no
  record names them as parent), in policy order (priority-lru: lowest priority, then least
  recently used by the persisted logical clock). A record becomes a leaf only
  after its last child is removed, so chains are cut from the end. A QUEUED
  victim's write is cancelled (disk.py): queued entries are never what holds
  the budget full.
- Candidates sit in a lazy heap: every change that may make a record a
  candidate pushes (sort key, key); a popped item is used only if it still
  matches the record, so eviction costs O(log n) even over 100k entries.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

from kvcellar.cache import Priority, make_policy

RESERVED, QUEUED, STORED = 0, 1, 2


class Record:
    __slots__ = ("key", "parent", "namespace", "num_bytes", "payload_bytes", "priority", "last_used",
                 "num_tokens", "is_partial", "has_logits", "state", "num_pins", "entry", "header")  # fmt: skip

    def __init__(self, key, parent, namespace, num_bytes, payload_bytes, priority, last_used, num_tokens,
                 is_partial, has_logits, state=STORED, entry=None, header=None) -> None:  # fmt: skip
        self.key: bytes = key
        self.parent: bytes = parent
        self.namespace: bytes = namespace
        self.num_bytes: int = num_bytes  # file size
        self.payload_bytes: int = payload_bytes
        self.priority: Priority = Priority(priority)
        self.last_used: int = last_used
        self.num_tokens: int = num_tokens
        self.is_partial: bool = is_partial
        self.has_logits: bool = has_logits
        self.state: int = state
        self.num_pins: int = 0
        self.entry = entry  # RESERVED / QUEUED: the CacheEntry with its payload; None once STORED
        self.header = header  # RESERVED / QUEUED: the EntryHeader the writer will write


class Catalog:
    def __init__(self, policy: str = "priority-lru") -> None:
        self._sort_key = make_policy(policy).sort_key
        self._records: dict[bytes, Record] = {}
        self._children: dict[bytes, set[bytes]] = {}  # parent -> keys of records of any state
        self._heap: list[tuple[tuple[int, ...], bytes]] = []
        self.num_bytes = 0
        self.clock = 0
        self._visible_count = {p: 0 for p in Priority}
        self._visible_bytes = {p: 0 for p in Priority}
        self._visible_partials = 0

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[Record]:
        return iter(list(self._records.values()))

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    # -- reads -------------------------------------------------------------------------------

    def get(self, key: bytes) -> Record | None:
        return self._records.get(key)

    def visible(self, key: bytes) -> Record | None:
        record = self._records.get(key)
        return record if record is not None and record.state != RESERVED else None

    def children(self, parent: bytes) -> list[Record]:
        found = (self._records[key] for key in self._children.get(parent, ()))
        return sorted((r for r in found if r.state != RESERVED), key=lambda r: r.key)

    def usage(self) -> tuple[int, int, dict[str, int], dict[str, int]]:
        """(visible entries, visible partials, entries by priority name, payload bytes by priority name)."""
        counts = {p.name: n for p, n in self._visible_count.items()}
        sizes = {p.name: n for p, n in self._visible_bytes.items()}
        return sum(self._visible_count.values()), self._visible_partials, counts, sizes

    # -- changes -----------------------------------------------------------------------------

    def add(self, record: Record) -> None:
        assert record.key not in self._records, "a key has one record; remove the old one first"
        self._records[record.key] = record
        self._children.setdefault(record.parent, set()).add(record.key)
        self.num_bytes += record.num_bytes
        self.clock = max(self.clock, record.last_used)
        if record.state != RESERVED:
            self._count(record, 1)
        self._push(record)

    def publish(self, record: Record) -> None:
        """RESERVED -> QUEUED: the entry becomes visible."""
        assert record.state == RESERVED
        record.state = QUEUED
        self._count(record, 1)
        self._push(record)

    def stored(self, record: Record) -> None:
        """QUEUED -> STORED: the file is durable and indexed; the payload is dropped from memory."""
        record.state = STORED
        record.entry = record.header = None

    def remove(self, record: Record) -> None:
        del self._records[record.key]
        siblings = self._children[record.parent]
        siblings.discard(record.key)
        if not siblings:
            del self._children[record.parent]
            parent = self._records.get(record.parent)
            if parent is not None:
                self._push(parent)  # it may have become a leaf
        self.num_bytes -= record.num_bytes
        if record.state != RESERVED:
            self._count(record, -1)

    def touch(self, record: Record, priority: Priority | None = None) -> None:
        if priority is not None and priority > record.priority:
            if record.state != RESERVED:
                self._count(record, -1)
            record.priority = Priority(priority)
            if record.state != RESERVED:
                self._count(record, 1)
        record.last_used = self.tick()
        self._push(record)

    def unpin(self, record: Record) -> None:
        record.num_pins -= 1
        if record.num_pins == 0:
            self._push(record)

    # -- eviction ----------------------------------------------------------------------------

    def plan_evictions(self, num_bytes_needed: int, protected: bytes | None) -> list[Record] | None:
        """Candidates freeing `num_bytes_needed` bytes in policy order, or None (and nothing changes)."""
        if num_bytes_needed <= 0:
            return []
        victims: list[Record] = []
        chosen: set[bytes] = set()
        put_back: list[tuple[tuple[int, ...], bytes]] = []
        num_freed = 0
        while num_freed < num_bytes_needed:
            if not self._heap:
                for item in put_back + [(self._sort_key(v), v.key) for v in victims]:
                    heapq.heappush(self._heap, item)
                return None
            item = heapq.heappop(self._heap)
            record = self._records.get(item[1])
            if record is None or record.key in chosen or not self._is_candidate(record, item[0], chosen):
                continue  # stale: the record changed since this item was pushed
            if record.key == protected:
                put_back.append(item)
                continue
            victims.append(record)
            chosen.add(record.key)
            num_freed += record.num_bytes
            parent = self._records.get(record.parent)
            if parent is not None and self._children[record.parent] <= chosen:
                heapq.heappush(self._heap, (self._sort_key(parent), parent.key))
        for item in put_back:
            heapq.heappush(self._heap, item)
        return victims

    def _is_candidate(self, record: Record, sort_key: tuple[int, ...], chosen: set[bytes]) -> bool:
        if record.state == RESERVED or record.num_pins or sort_key != self._sort_key(record):
            return False
        children = self._children.get(record.key)
        return not children or children <= chosen

    def _push(self, record: Record) -> None:
        if record.state != RESERVED and record.num_pins == 0 and record.key not in self._children:
            heapq.heappush(self._heap, (self._sort_key(record), record.key))
            if len(self._heap) > 2 * len(self._records) + 1024:
                self._compact()

    def _compact(self) -> None:
        self._heap = [
            (self._sort_key(r), r.key)
            for r in self._records.values()
            if r.state != RESERVED and r.num_pins == 0 and r.key not in self._children
        ]
        heapq.heapify(self._heap)

    def _count(self, record: Record, sign: int) -> None:
        self._visible_count[record.priority] += sign
        self._visible_bytes[record.priority] += sign * record.payload_bytes
        self._visible_partials += sign * record.is_partial
