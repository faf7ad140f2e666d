"""How entries move between ordered tiers (fastest first) on behalf of one `PrefixCache`.

Operations: `TierSet.find`, `.children` (reads across tiers, the fastest
holder wins); `.is_networked`, `.ask_chain` (tiers across a network answer
a whole chain in one round trip: `ChainLookup`); `.store` (into one tier, parent checked), `.store_tail`
(first tier, count-limited), `.write_through` (copies of an insert into the
write-through tiers), `.demote` (evicted entries go one tier down),
`.promote` (entries hit in a slower tier are copied into the first tier).

Invariants:
- An entry object lives in one tier only: moves store `copy_for_tier()`
  copies, because a tier owns the `last_used` and `num_pins` of its objects.
- A refusal by a slower tier (queue full, no room) is a drop: counted in
  `num_dropped` and reported through `observer.on_refuse`, never silent.
- The tail count limit applies to the first tier; slower tiers bound
  tails by bytes only. Runs under the owner's lock, like the tiers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from kvcellar.cache.entry import CacheEntry
from kvcellar.cache.hashing import BlockHash
from kvcellar.cache.observer import CacheObserver
from kvcellar.cache.tails import TailLRU
from kvcellar.cache.tier import ChainLookup, Tier


class TierSet:
    def __init__(
        self,
        tiers: Sequence[Tier],
        root: BlockHash,
        tails: TailLRU,
        observer: CacheObserver,
        counters: Counter[str],
        write_through: Sequence[str] = (),
    ) -> None:
        names = [tier.name for tier in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be distinct, got {names}")
        unknown = [name for name in write_through if name not in names[1:]]
        if unknown:
            raise ValueError(f"write_through names {unknown} are not tiers after the first; tiers: {names}")
        self.tiers: tuple[Tier, ...] = tuple(tiers)
        self.tails = tails
        self._root = root
        self._observer = observer
        self._counters = counters
        self._write_through = tuple(names.index(name) for name in write_through)

    # -- reads -------------------------------------------------------------------------------

    def find(self, key: BlockHash) -> tuple[CacheEntry, int] | None:
        for index, tier in enumerate(self.tiers):
            if tier.contains(key):
                entry = tier.get(key)
                if entry is not None:
                    return entry, index
        return None

    def is_networked(self, index: int) -> bool:
        return isinstance(self.tiers[index], ChainLookup)

    def ask_chain(self, parent: BlockHash, keys: Sequence[BlockHash]) -> bool:
        """Ask every networked tier about the chain `keys` after `parent`; True if one holds its first key."""
        found = [tier.find_chain(parent, keys) for tier in self.tiers if isinstance(tier, ChainLookup)]
        return any(count > 0 for count in found)

    def children(self, parent: BlockHash, where: dict[BlockHash, int], ask_network: bool = True) -> list[CacheEntry]:
        """The children of `parent` in every tier. Tiers across a network are asked (a round trip) only with
        `ask_network`, or when no local tier holds a child."""
        found: list[CacheEntry] = []
        for index, tier in enumerate(self.tiers):
            if found and not ask_network and self.is_networked(index):
                continue
            for child in tier.children(parent):
                if child.key not in where:  # the fastest tier holding a key wins
                    where[child.key] = index
                    found.append(child)
        return found

    def index_of(self, tier_name: str | None) -> int:
        if tier_name is None:
            return 0
        for index, tier in enumerate(self.tiers):
            if tier.name == tier_name:
                return index
        raise ValueError(f"no tier named {tier_name!r}; this cache has: {', '.join(t.name for t in self.tiers)}")

    # -- stores ------------------------------------------------------------------------------

    def has_parent(self, entry: CacheEntry) -> bool:
        """Whether `entry` may be stored: its parent is the root or a resident block (chains stay connected)."""
        if entry.parent == self._root:
            return True
        parent = self.find(entry.parent)
        return parent is not None and not parent[0].is_tail

    def store(self, entry: CacheEntry, index: int) -> BlockHash | None:
        """Store `entry` in tiers[index] if its parent is the root or a resident block; its key or None."""
        if not self.has_parent(entry):
            return self.refuse(entry, f"parent {entry.parent.hex()} is not a resident block")
        tier = self.tiers[index]
        result = tier.prepare_store(entry)
        if not result.accepted:
            return self.refuse(entry, result.reason)
        self.demote(result.evicted, index)
        is_new = not tier.contains(entry.key)
        tier.complete_store(entry.key)
        if is_new:
            self._observer.on_store(entry, tier.name)
        return entry.key

    def store_tail(self, entry: CacheEntry) -> BlockHash | None:
        """Store a tail in the first tier under the count limit (the LRU excess is demoted)."""
        tier, key = self.tiers[0], entry.key
        old = tier.get(key)
        superseded = old is not None and entry.has_logits and not old.has_logits
        if superseded:
            tier.evict(key)  # the same tail with logits replaces it; not an eviction for space
        if (old is None or superseded) and not self.tails.can_admit(self.tiers):
            num_max = self.tails.max_entries
            full = f"max_partial_entries={num_max} reached and every tail is pinned"
            return self.refuse(entry, full if num_max else "tails disabled")
        stored = self.store(entry, 0)
        if stored is None and superseded:
            self.store(old, 0)  # the new tail was refused: keep the old one (its bytes were just freed)
        if tier.contains(key):
            self.tails.touch(key, 0)
            for victim, index in self.tails.overflow(self.tiers):
                self.tiers[index].evict(victim.key)
                self.demote((victim,), index)
        return stored

    def write_through(self, entry: CacheEntry) -> bool:
        """Hand a copy of an inserted entry to each write-through tier; True if one holds it."""
        if not self._write_through or not self.has_parent(entry):
            return False
        accepted = [self.move(entry, index, demotion=False) for index in self._write_through]
        return any(accepted)

    def refuse(self, entry: CacheEntry, reason: str) -> None:
        self._observer.on_refuse(entry, reason)

    # -- movement ----------------------------------------------------------------------------

    def demote(self, entries: Iterable[CacheEntry], from_index: int) -> None:
        """Entries evicted from tiers[from_index]: count them, then move each to the next tier down."""
        name = self.tiers[from_index].name
        for entry in entries:
            self._counters["num_evictions"] += 1
            if entry.is_tail and from_index == 0:
                self.tails.forget(entry.key)
            self._observer.on_evict(entry, name)
            if from_index + 1 < len(self.tiers) and entry.payload is not None:
                self.move(entry, from_index + 1, demotion=True)

    def move(self, entry: CacheEntry, index: int, *, demotion: bool) -> bool:
        """Store a copy of `entry` in tiers[index] (no parent check: it was valid where it came from)."""
        tier = self.tiers[index]
        is_new = not tier.contains(entry.key)
        result = tier.prepare_store(entry.copy_for_tier())
        if not result.accepted:
            self._counters["num_dropped"] += 1
            self._observer.on_refuse(entry, f"{tier.name}: {result.reason}")
            return False
        self.demote(result.evicted, index)
        tier.complete_store(entry.key)
        if is_new:
            self._counters["num_demotions"] += demotion
            self._observer.on_store(entry, tier.name)
        return True

    def promote(self, entries: Iterable[CacheEntry], where: dict[BlockHash, int]) -> dict[BlockHash, object]:
        """After a hit: touch first-tier tails; copy entries loaded from slower tiers into the first.

        Returns the promoted copies' payloads by key (the first tier may have moved them to its medium).
        """
        promoted: dict[BlockHash, object] = {}
        for entry in entries:
            if where[entry.key] == 0:
                if entry.is_tail:
                    self.tails.touch(entry.key, 0)
                continue
            copy = entry.copy_for_tier()
            stored = self.store_tail(copy) if entry.is_tail else self.store(copy, 0)
            if stored is not None:
                self._counters["num_promotions"] += 1
                promoted[entry.key] = copy.payload
        return promoted
