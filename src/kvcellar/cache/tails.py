"""Count-bounded recency order of the tail entries (fewer tokens than a block).

Operations: `touch` (insert or promote to most recent), `forget`, `prune`
(drop keys a tier no longer holds), `can_admit` (is there room for one more,
evicting unpinned tails?), `overflow` (the least recently used unpinned
tails beyond the bound, which the owner then evicts).

The entries themselves live in tiers (and count against their byte budgets);
this index only records key -> tier index in recency order, so it never owns
a payload. Invariant kept by the owner: after every insert, at most
`max_entries` keys are recorded.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from kvcellar.cache.entry import CacheEntry
from kvcellar.cache.hashing import BlockHash
from kvcellar.cache.tier import Tier
from kvcellar.checks import is_int


class TailLRU:
    def __init__(self, max_entries: int) -> None:
        if not is_int(max_entries) or max_entries < 0:
            raise ValueError(f"max_partial_entries must be an integer >= 0 (0 disables tails), got {max_entries!r}")
        self.max_entries = max_entries
        self._order: OrderedDict[BlockHash, int] = OrderedDict()  # key -> tier index, least recent first

    def __len__(self) -> int:
        return len(self._order)

    def touch(self, key: BlockHash, tier_index: int) -> None:
        self._order[key] = tier_index
        self._order.move_to_end(key)

    def forget(self, key: BlockHash) -> None:
        self._order.pop(key, None)

    def prune(self, tiers: Sequence[Tier]) -> None:
        """Forget keys whose tier dropped them (a clear, or a budget change made on the tier itself)."""
        for key, index in list(self._order.items()):
            if not tiers[index].contains(key):
                del self._order[key]

    def can_admit(self, tiers: Sequence[Tier]) -> bool:
        """Whether one more tail fits once unpinned ones are evicted (False when disabled)."""
        if self.max_entries == 0:
            return False
        self.prune(tiers)
        num_needed = len(self._order) + 1 - self.max_entries
        return num_needed <= sum(1 for entry, _ in self._resident(tiers) if entry.num_pins == 0)

    def overflow(self, tiers: Sequence[Tier]) -> list[tuple[CacheEntry, int]]:
        """Remove and return (entry, tier index) of the LRU unpinned tails beyond the bound."""
        self.prune(tiers)
        num_excess = len(self._order) - self.max_entries
        if num_excess <= 0:
            return []
        victims = [(entry, index) for entry, index in self._resident(tiers) if entry.num_pins == 0][:num_excess]
        for entry, _ in victims:
            del self._order[entry.key]
        return victims

    def _resident(self, tiers: Sequence[Tier]) -> list[tuple[CacheEntry, int]]:
        found = [(tiers[index].get(key), index) for key, index in self._order.items()]
        return [(entry, index) for entry, index in found if entry is not None]
