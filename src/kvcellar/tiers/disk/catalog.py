"""The disk tier's in-memory view of its entries: records, child links, occupancy, eviction order.

Operations: `Record` (one entry: metadata, `RecordState`, pins; the
payload only while its write is queued), `Catalog.add` / `publish` /
`stored` / `remove` / `get` / `visible` / `children` / `touch` / `unpin` /
`plan_evictions` / `usage`, and `evictable` / `child_keys` /
`eviction_items` (what the eviction planner reads).

States: RESERVED (bytes counted, not visible) -> QUEUED (visible, served from
the queued payload in memory) -> STORED (file durable and indexed).

Invariants:
- `num_bytes` = file bytes of every record, whatever its state.
- Eviction (cache/eviction.py, the planner every tier uses): candidates are
  visible (QUEUED or STORED), unpinned leaves (no record names them as
  parent), in policy order (priority-lru: lowest priority, then least
  recently used by the persisted logical clock). A record becomes a leaf
  only after its last child is removed, so chains are cut from the end. A
  QUEUED victim's write is cancelled (tier.py): queued entries are never
  what holds the budget full. The catalog offers a record to the planner on
  every change that may make it a candidate.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Set
from enum import Enum

from kvcellar.cache import Priority, make_policy
from kvcellar.cache.eviction import EvictionPlanner
from kvcellar.cache.policy import DEFAULT_EVICTION_POLICY


class RecordState(Enum):
    """Where a record is in its life: RESERVED -> QUEUED -> STORED (module docstring)."""

    RESERVED = "reserved"
    QUEUED = "queued"
    STORED = "stored"


class Record:
    __slots__ = ("key", "parent", "namespace", "num_bytes", "payload_bytes", "priority", "last_used",
                 "num_tokens", "is_tail", "has_logits", "state", "num_pins", "entry", "header")  # fmt: skip

    def __init__(self, key, parent, namespace, num_bytes, payload_bytes, priority, last_used, num_tokens,
                 is_tail, has_logits, state=RecordState.STORED, entry=None, header=None) -> None:  # fmt: skip
        self.key: bytes = key
        self.parent: bytes = parent
        self.namespace: bytes = namespace
        self.num_bytes: int = num_bytes  # file size
        self.payload_bytes: int = payload_bytes
        self.priority: Priority = Priority(priority)
        self.last_used: int = last_used
        self.num_tokens: int = num_tokens
        self.is_tail: bool = is_tail
        self.has_logits: bool = has_logits
        self.state: RecordState = state
        self.num_pins: int = 0
        self.entry = entry  # RESERVED / QUEUED: the CacheEntry with its payload; None once STORED
        self.header = header  # RESERVED / QUEUED: the EntryHeader the writer will write


class Catalog:
    def __init__(self, policy: str = DEFAULT_EVICTION_POLICY) -> None:
        self._records: dict[bytes, Record] = {}
        self._children: dict[bytes, set[bytes]] = {}  # parent -> keys of records of any state
        self._planner = EvictionPlanner(make_policy(policy), self)
        self.num_bytes = 0
        self.clock = 0
        self._visible_count = {p: 0 for p in Priority}
        self._visible_bytes = {p: 0 for p in Priority}
        self._visible_tails = 0

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
        return record if record is not None and record.state != RecordState.RESERVED else None

    def children(self, parent: bytes) -> list[Record]:
        found = (self._records[key] for key in self._children.get(parent, ()))
        return sorted((r for r in found if r.state != RecordState.RESERVED), key=lambda r: r.key)

    def usage(self) -> tuple[int, int, dict[str, int], dict[str, int]]:
        """(visible entries, visible tails, entries by priority name, payload bytes by priority name)."""
        counts = {p.name: n for p, n in self._visible_count.items()}
        sizes = {p.name: n for p, n in self._visible_bytes.items()}
        return sum(self._visible_count.values()), self._visible_tails, counts, sizes

    # -- changes -----------------------------------------------------------------------------

    def add(self, record: Record) -> None:
        assert record.key not in self._records, "a key has one record; remove the old one first"
        self._records[record.key] = record
        self._children.setdefault(record.parent, set()).add(record.key)
        self.num_bytes += record.num_bytes
        self.clock = max(self.clock, record.last_used)
        if record.state != RecordState.RESERVED:
            self._count(record, 1)
        self._planner.offer(record)

    def publish(self, record: Record) -> None:
        """RESERVED -> QUEUED: the entry becomes visible."""
        assert record.state == RecordState.RESERVED
        record.state = RecordState.QUEUED
        self._count(record, 1)
        self._planner.offer(record)

    def stored(self, record: Record) -> None:
        """QUEUED -> STORED: the file is durable and indexed; the payload is dropped from memory."""
        record.state = RecordState.STORED
        record.entry = record.header = None

    def remove(self, record: Record) -> None:
        del self._records[record.key]
        siblings = self._children[record.parent]
        siblings.discard(record.key)
        if not siblings:
            del self._children[record.parent]
            parent = self._records.get(record.parent)
            if parent is not None:
                self._planner.offer(parent)  # it may have become a leaf
        self.num_bytes -= record.num_bytes
        if record.state != RecordState.RESERVED:
            self._count(record, -1)

    def touch(self, record: Record, priority: Priority | None = None) -> None:
        if priority is not None and priority > record.priority:
            if record.state != RecordState.RESERVED:
                self._count(record, -1)
            record.priority = Priority(priority)
            if record.state != RecordState.RESERVED:
                self._count(record, 1)
        record.last_used = self.tick()
        self._planner.offer(record)

    def unpin(self, record: Record) -> None:
        record.num_pins -= 1
        if record.num_pins == 0:
            self._planner.offer(record)

    # -- eviction ----------------------------------------------------------------------------

    def plan_evictions(self, num_bytes_needed: int, protected: bytes | None) -> list[Record] | None:
        """Candidates freeing `num_bytes_needed` bytes in policy order, or None (and nothing changes)."""
        return self._planner.plan(num_bytes_needed, protected)

    def evictable(self, key: bytes) -> Record | None:
        """The eviction source's view: a visible, unpinned record."""
        record = self._records.get(key)
        return record if record is not None and record.state != RecordState.RESERVED and record.num_pins == 0 else None

    def child_keys(self, key: bytes) -> Set[bytes]:
        return self._children.get(key, frozenset())

    def eviction_items(self) -> Collection[Record]:
        return self._records.values()

    def _count(self, record: Record, sign: int) -> None:
        self._visible_count[record.priority] += sign
        self._visible_bytes[record.priority] += sign * record.payload_bytes
        self._visible_tails += sign * record.is_tail
