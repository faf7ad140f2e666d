"""The in-process memory tier: payloads held as Python objects, under a byte budget.

Operations: the `Tier` protocol (tier.py); `flush` and `close` do nothing.
Serves the `device` tier (where the model computes) and the `host` tier (RAM
beside a GPU); an optional `adopt` callable moves a payload into the medium
when it is stored (for example GPU -> pinned host memory), and an optional
`admit` callable may refuse a store the medium cannot take cheaply right now
(it returns the reason; a refusal is a counted drop, as for a full tier).

Eviction invariants:
1. The byte total (resident plus reserved) never exceeds the budget, at any
   moment: bytes are reserved, evicting first, before an entry is inserted,
   and a store that cannot be fully reserved is refused with nothing evicted.
2. Only leaves are evicted for space: an entry that is the parent of another
   resident or reserved entry is not a candidate, so a chain never loses a
   middle link; a child always goes before its parent. The parent of the entry
   being stored is protected too.
3. Among candidate leaves, the policy decides (priority-lru: lowest priority,
   then least recently used). `last_used` comes from a per-tier integer clock
   that increases on every touch, so the order is exact and testable. The
   planner is the one every tier uses (cache/eviction.py); the tier offers
   it an entry on every change that may make it a candidate or reorder it.
4. Pinned entries (num_pins > 0) are never evicted for space. `evict(key)`
   and `clear()` are explicit requests and do remove pinned entries: the
   loader keeps its reference to the payload object and `complete_load` of a
   key that is gone is a no-op.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Set

from kvcellar.cache.entry import CacheEntry, Priority
from kvcellar.cache.eviction import EvictionPlanner
from kvcellar.cache.hashing import BlockHash
from kvcellar.cache.policy import DEFAULT_EVICTION_POLICY, make_policy
from kvcellar.cache.tier import StoreResult, TierStats, check_budget, check_tier_name, usage_by_priority


class MemoryTier:
    """Payloads held as Python objects in this process, under a byte budget."""

    def __init__(
        self,
        budget_bytes: int,
        *,
        name: str = "device",
        policy: str = DEFAULT_EVICTION_POLICY,
        adopt: Callable[[object], object] | None = None,
        admit: Callable[[object], str | None] | None = None,
    ) -> None:
        check_tier_name(name)
        check_budget(budget_bytes)
        self.name = name
        self._adopt = adopt  # payload -> payload in this medium, applied when a new entry is reserved
        self._admit = admit  # payload -> None to accept, else why not (checked before anything is evicted)
        self._budget_bytes = budget_bytes
        self._num_bytes = 0  # resident + reserved; invariant: <= self._budget_bytes
        self._clock = 0
        self._entries: dict[BlockHash, CacheEntry] = {}  # visible to lookups
        self._pending: dict[BlockHash, CacheEntry] = {}  # reserved, not yet visible
        # parent key -> keys of resident and reserved children (dict as an ordered set, so
        # children() has a deterministic order). An entry is a leaf iff its key is absent.
        self._child_keys: dict[BlockHash, dict[BlockHash, None]] = {}
        self._planner = EvictionPlanner(make_policy(policy), self)

    # -- reads -------------------------------------------------------------------------------

    @property
    def num_bytes(self) -> int:
        return self._num_bytes

    @property
    def num_entries(self) -> int:
        return len(self._entries)

    @property
    def budget_bytes(self) -> int:
        return self._budget_bytes

    @budget_bytes.setter
    def budget_bytes(self, budget_bytes: int) -> None:
        self.set_budget(budget_bytes)

    def get(self, key: BlockHash) -> CacheEntry | None:
        return self._entries.get(key)

    def contains(self, key: BlockHash) -> bool:
        return key in self._entries

    def children(self, parent: BlockHash) -> list[CacheEntry]:
        keys = self._child_keys.get(parent, {})
        return [self._entries[key] for key in keys if key in self._entries]

    def entries(self) -> list[CacheEntry]:
        return list(self._entries.values())

    # -- load --------------------------------------------------------------------------------

    def prepare_load(self, keys: Iterable[BlockHash]) -> list[CacheEntry]:
        """Pin and touch the entries of `keys` (all resident, or KeyError and nothing pinned)."""
        keys = list(keys)
        missing = [key.hex() for key in keys if key not in self._entries]
        if missing:
            raise KeyError(f"tier {self.name!r} holds no entry {missing[0]}; look it up again")
        loaded = [self._entries[key] for key in keys]
        for entry in loaded:
            entry.num_pins += 1
            entry.last_used = self._tick()
        return loaded

    def complete_load(self, keys: Iterable[BlockHash]) -> None:
        """Unpin; keys evicted meanwhile (explicitly) are skipped."""
        for key in keys:
            entry = self._entries.get(key)
            if entry is None:
                continue
            if entry.num_pins <= 0:
                raise ValueError(f"entry {key.hex()} is not pinned; complete_load called twice?")
            entry.num_pins -= 1
            self._planner.offer(entry)

    # -- store -------------------------------------------------------------------------------

    def prepare_store(self, entry: CacheEntry) -> StoreResult:
        """Reserve `entry.num_bytes`, evicting leaves as needed; `complete_store` publishes it.

        An existing key (resident or reserved) is touched and its priority raised
        to max(old, new); nothing is counted twice.
        """
        existing = self._entries.get(entry.key) or self._pending.get(entry.key)
        if existing is not None:
            existing.priority = Priority(max(existing.priority, entry.priority))
            existing.last_used = self._tick()
            self._planner.offer(existing)
            return StoreResult(True, (), "already stored")
        if self._budget_bytes == 0 or entry.num_bytes > self._budget_bytes:
            reason = f"entry of {entry.num_bytes} bytes exceeds the {self.name} budget of {self._budget_bytes} bytes"
            return StoreResult(False, (), reason)
        refusal = self._admit(entry.payload) if self._admit is not None else None
        if refusal is not None:
            return StoreResult(False, (), refusal)
        victims = self._planner.plan(self._num_bytes + entry.num_bytes - self._budget_bytes, entry.parent)
        if victims is None:
            reason = f"cannot free {entry.num_bytes} bytes in {self.name}: the other entries are pinned or are parents"
            return StoreResult(False, (), reason)
        for victim in victims:
            self._remove(victim)
        if self._adopt is not None:
            entry.payload = self._adopt(entry.payload)
        entry.last_used = self._tick()
        self._pending[entry.key] = entry
        self._child_keys.setdefault(entry.parent, {})[entry.key] = None
        self._num_bytes += entry.num_bytes
        return StoreResult(True, tuple(victims), "")

    def complete_store(self, key: BlockHash) -> None:
        """Make a reserved entry visible (a no-op for a key that is already resident)."""
        entry = self._pending.pop(key, None)
        if entry is not None:
            self._entries[key] = entry
            self._planner.offer(entry)
        elif key not in self._entries:
            raise KeyError(f"tier {self.name!r} has no reservation for {key.hex()}; call prepare_store first")

    def abort_store(self, key: BlockHash) -> None:
        """Drop a reservation whose payload transfer failed."""
        entry = self._pending.pop(key, None)
        if entry is not None:
            self._unlink(entry)

    # -- bookkeeping -------------------------------------------------------------------------

    def touch(self, keys: Iterable[BlockHash]) -> None:
        """Mark resident `keys` as used now, in order (the last key is the most recent)."""
        for key in keys:
            entry = self._entries.get(key)
            if entry is not None:
                entry.last_used = self._tick()
                self._planner.offer(entry)

    def evict(self, key: BlockHash) -> CacheEntry | None:
        """Remove exactly this resident entry, even if pinned or a parent (its children stay)."""
        entry = self._entries.get(key)
        if entry is not None:
            self._remove(entry)
        return entry

    def set_budget(self, budget_bytes: int) -> tuple[CacheEntry, ...]:
        """Change the budget; lowering it evicts leaves at once and returns them in eviction order.

        Raises ValueError (and changes nothing) when pinned, reserved or parent
        entries hold more bytes than the new budget.
        """
        check_budget(budget_bytes)
        victims = self._planner.plan(self._num_bytes - budget_bytes, None)
        if victims is None:
            raise ValueError(
                f"cannot lower the {self.name} budget to {budget_bytes} bytes while pinned or in-flight entries "
                f"hold more; finish the loads and stores (complete_load / complete_store) and retry"
            )
        for victim in victims:
            self._remove(victim)
        self._budget_bytes = budget_bytes
        return tuple(victims)

    def clear(self) -> None:
        """Remove every resident entry; reservations in flight stay."""
        for entry in list(self._entries.values()):
            self._remove(entry)

    def stats(self) -> TierStats:
        num_entries, num_tails, by_count, by_bytes = usage_by_priority(self._entries.values())
        return TierStats(self.name, num_entries, num_tails, self._num_bytes, self._budget_bytes, by_count, by_bytes)

    def flush(self, timeout_s: float | None = None) -> bool:
        return True  # nothing is ever in flight outside the caller's own calls

    def close(self) -> None:
        pass

    # -- internals ---------------------------------------------------------------------------

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    # The eviction source (cache/eviction.py): visible, unpinned entries; children of any state.

    def evictable(self, key: BlockHash) -> CacheEntry | None:
        entry = self._entries.get(key)
        return entry if entry is not None and entry.num_pins == 0 else None

    def child_keys(self, key: BlockHash) -> Set[BlockHash]:
        return self._child_keys.get(key, {}).keys()

    def eviction_items(self) -> Collection[CacheEntry]:
        return self._entries.values()

    def _remove(self, entry: CacheEntry) -> None:
        del self._entries[entry.key]
        self._unlink(entry)

    def _unlink(self, entry: CacheEntry) -> None:
        self._num_bytes -= entry.num_bytes
        siblings = self._child_keys[entry.parent]
        del siblings[entry.key]
        if not siblings:
            del self._child_keys[entry.parent]
            parent = self._entries.get(entry.parent)
            if parent is not None:
                self._planner.offer(parent)  # it may have become a leaf
