"""Storage tiers: the one protocol every medium speaks, and what a tier reports.

Operations: `get`, `contains`, `children`, `entries` (reads, no side effects);
`prepare_load`/`complete_load` (pin while a payload is copied out);
`prepare_store`/`complete_store`/`abort_store` (reserve bytes, then publish);
`touch`, `evict`, `clear`, `set_budget` / `budget_bytes` (bookkeeping);
`stats` (a `TierStats` snapshot), `flush` and `close` (persistent media).
`check_tier_name` (a new tier is named by its medium), `check_known_tier`
(a caller's tier name is one of this cache's).
`namespace_usage(tier, namespaces)`: a tier's occupancy by some namespaces'
entries only (a tenant's share).

Optional abilities, each a runtime-checkable protocol a tier has by having
its methods (asked with `isinstance`, never `hasattr`): `BackgroundWriter`
(writes behind on its own thread: `defer_writes`, a bounded `close`),
`PersistentTier` (`sample_key`, to time a load at start-up), `NamespaceUsage`
(`usage_of(namespaces)`, when listing `entries()` is expensive), `ChainLookup`
(a tier across a network: `contains`/`get`/`entries` answer from what this
process knows, and `find_chain` asks the server about a whole chain in one
round trip);
`BackgroundHelper` types a tier's helper thread (`pause`, `flush`, `close`).

Tiers are named by medium, fastest first: device, host, disk, remote.
`MemoryTier` (kvcellar.tiers.memory) serves device and host; the disk tier lives in
`kvcellar.tiers.disk.tier`.

Contract shared by every tier:
1. Budget: resident plus reserved bytes never exceed `budget_bytes`, at any
   moment; bytes are reserved (evicting first) before an entry is visible.
2. Chains: only leaves are evicted for space, and never the parent of the
   entry being stored, so a chain does not lose a middle link.
3. Loads: `prepare_load` returns the entries WITH their payloads, in the order
   asked (a memory tier returns its resident objects; a persistent tier reads
   the payload and returns a fresh entry, so its pin covers only that read and
   its `complete_load` may be a no-op). A key that is gone, or whose stored
   bytes fail validation, raises KeyError and leaves nothing pinned.
4. `get`/`children` may return metadata-only entries (payload None) for
   media where reading the payload is expensive.
5. Thread-safety: the owner (`PrefixCache`) serializes its calls; a tier with
   its own background thread (disk) also locks internally.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from kvcellar.cache.entry import CacheEntry, Priority
from kvcellar.cache.hashing import BlockHash
from kvcellar.checks import is_int
from kvcellar.errors import UnknownTierError

TIER_NAMES = ("device", "host", "disk", "remote")


@dataclass(frozen=True)
class StoreResult:
    accepted: bool
    evicted: tuple[CacheEntry, ...] = ()  # entries removed to make room, in eviction order
    reason: str = ""  # why a store was refused, or a note on an accepted one


@dataclass(frozen=True)
class TierStats:
    """Occupancy of one tier plus counters of its medium (drops, corrupt files, load bandwidth...)."""

    name: str
    num_entries: int
    num_partial_entries: int  # tail entries (the public name of the stat)
    num_bytes: int  # resident + reserved, in the tier's own unit of storage (file bytes on disk)
    budget_bytes: int
    num_entries_by_priority: dict[str, int]
    num_bytes_by_priority: dict[str, int]  # payload bytes of resident entries
    counters: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Tier(Protocol):
    name: str
    budget_bytes: int  # settable; lowering it evicts at once

    @property
    def num_bytes(self) -> int: ...

    @property
    def num_entries(self) -> int: ...

    def get(self, key: BlockHash) -> CacheEntry | None: ...

    def contains(self, key: BlockHash) -> bool: ...

    def children(self, parent: BlockHash) -> list[CacheEntry]: ...

    def entries(self) -> list[CacheEntry]: ...

    def prepare_load(self, keys: Iterable[BlockHash]) -> list[CacheEntry]: ...

    def complete_load(self, keys: Iterable[BlockHash]) -> None: ...

    def prepare_store(self, entry: CacheEntry) -> StoreResult: ...

    def complete_store(self, key: BlockHash) -> None: ...

    def abort_store(self, key: BlockHash) -> None: ...

    def touch(self, keys: Iterable[BlockHash]) -> None: ...

    def evict(self, key: BlockHash) -> CacheEntry | None: ...

    def set_budget(self, budget_bytes: int) -> tuple[CacheEntry, ...]: ...

    def clear(self) -> None: ...

    def stats(self) -> TierStats: ...

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until stores in flight are durable; False if `timeout_s` passed first."""
        ...

    def close(self) -> None:
        """Flush, then release files and threads; the tier must not be used afterwards."""
        ...


# Optional abilities. A tier (or helper) has one by having its methods; `isinstance` on these
# runtime-checkable protocols is the one way the cache asks, so each ability is named and typed once.


@runtime_checkable
class BackgroundWriter(Protocol):
    """A tier that writes behind, on a thread of its own (disk): it holds writes back while the model
    computes, reports `num_written` / `num_dropped` / `num_queued` in `stats().counters`, and its close
    drains the queue within a time bound."""

    def defer_writes(self, active: bool) -> None:
        """The engine is (not) computing a prefill: hold background writes back meanwhile."""
        ...

    def close(self, timeout_s: float | None = 30.0) -> None:
        """Drain queued writes for up to `timeout_s` (what is left is dropped), then release the medium."""
        ...


@runtime_checkable
class PersistentTier(Protocol):
    """A tier whose entries outlive the process (disk): it can name one stored block to time a load on."""

    def sample_key(self, namespace: BlockHash) -> BlockHash | None:
        """A stored block of `namespace` (None: it holds none), to measure the tier's load rate at start-up."""
        ...


@runtime_checkable
class NamespaceUsage(Protocol):
    """A tier that reports a namespace's occupancy itself, where listing `entries()` is expensive (disk)."""

    def usage_of(self, namespaces: Collection[BlockHash]) -> TierStats: ...


@runtime_checkable
class ChainLookup(Protocol):
    """A tier whose medium is across a network (remote): asking it per key would cost a round trip each.

    Its `contains` and `get` answer from what this process knows (entries it stored, entries its last
    questions found) without a round trip; `find_chain` asks the server about a whole chain at once and
    updates that knowledge. `children` asks the server (one round trip). A tier that cannot reach its
    server answers every question with a miss, never an error.
    """

    def find_chain(self, parent: BlockHash, keys: Sequence[BlockHash]) -> int:
        """How many leading `keys` (a chain of blocks after `parent`) the server holds; `contains`/`get`
        answer for those afterwards. One round trip."""
        ...


@runtime_checkable
class BackgroundHelper(Protocol):
    """A tier's helper thread (the pinned-memory reserve): paused while a request runs, flushed and
    closed with the cache."""

    def pause(self, active: bool) -> None: ...

    def flush(self, timeout_s: float | None = None) -> bool: ...

    def close(self) -> None: ...


def check_budget(budget_bytes: int) -> None:
    if not is_int(budget_bytes) or budget_bytes < 0:
        raise ValueError(f"budget_bytes must be an integer >= 0 (0 stores nothing), got {budget_bytes!r}")


def check_tier_name(name: str) -> None:
    """A tier being built must be named by its medium (TIER_NAMES)."""
    if name not in TIER_NAMES:
        raise ValueError(f"tier name {name!r} is not a medium; use one of: {', '.join(TIER_NAMES)}")


def check_known_tier(name: str | None, known: Sequence[str]) -> None:
    """A caller's tier (None: every tier) must be one this cache has: raise UnknownTierError naming them."""
    if name is not None and name not in known:
        raise UnknownTierError(f"unknown cache tier {name!r}; tiers: {', '.join(known) or 'none (the cache is off)'}")


def usage_by_priority(entries: Iterable[CacheEntry]) -> tuple[int, int, dict[str, int], dict[str, int]]:
    """(entries, tail entries, entries by priority name, payload bytes by priority name)."""
    by_count = {priority.name: 0 for priority in Priority}
    by_bytes = {priority.name: 0 for priority in Priority}
    num_entries = num_tails = 0
    for entry in entries:
        num_entries += 1
        num_tails += entry.is_tail
        by_count[entry.priority.name] += 1
        by_bytes[entry.priority.name] += entry.num_bytes
    return num_entries, num_tails, by_count, by_bytes


def namespace_usage(tier: Tier, namespaces: Collection[BlockHash]) -> TierStats:
    """Occupancy of `tier` by the entries whose namespace root is in `namespaces` (no medium counters)."""
    if isinstance(tier, NamespaceUsage):
        return tier.usage_of(namespaces)
    entries = [entry for entry in tier.entries() if entry.namespace in namespaces]
    num_entries, num_tails, by_count, by_bytes = usage_by_priority(entries)
    return TierStats(tier.name, num_entries, num_tails, sum(e.num_bytes for e in entries), tier.budget_bytes,
                     by_count, by_bytes)  # fmt: skip
