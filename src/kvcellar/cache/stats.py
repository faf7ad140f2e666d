"""A frozen snapshot of prefix-cache counters and occupancy.

Operations: `CacheStats` (the snapshot; `hit_rate`) and `snapshot` (built
from each tier's `TierStats` plus the cache's running counters). Counters are
cumulative since the cache was created; occupancy is summed over tiers, and
`tiers` keeps each tier's own report (drops, corrupt files, load bandwidth).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kvcellar.cache.tier import TierStats


@dataclass(frozen=True, kw_only=True)
class CacheStats:
    num_lookups: int
    num_hit_tokens: int  # prompt tokens restored instead of computed
    num_miss_tokens: int  # prompt tokens left to compute
    num_saved_tokens: int  # = num_hit_tokens (prefill tokens the cache saved)
    num_evictions: int  # entries removed from a tier for space or for the tail count limit
    num_discards: int  # entries removed by discard() (failed validation)
    num_entries: int
    num_partial_entries: int  # tail entries (the public name of the stat)
    num_bytes: int  # resident + reserved, summed over tiers
    budget_bytes: int  # summed over tiers
    num_entries_by_priority: dict[str, int]  # Priority name -> resident entries
    num_bytes_by_priority: dict[str, int]  # Priority name -> resident bytes
    tokens_by_tier: dict[str, int]  # tier name -> restored tokens
    num_promotions: int = 0  # entries copied up into the first tier after a hit in a slower one
    num_demotions: int = 0  # evicted entries a slower tier newly accepted
    num_dropped: int = 0  # evicted or written-through entries a slower tier refused (queue full, no room)
    num_load_failures: int = 0  # lookups that found an entry a tier could not load, and looked again
    tiers: dict[str, TierStats] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        """Fraction of looked-up prompt tokens that were restored (0.0 before any lookup)."""
        total = self.num_hit_tokens + self.num_miss_tokens
        return self.num_hit_tokens / total if total else 0.0


def snapshot(tier_stats: Sequence[TierStats], counters: dict[str, int], tokens_by_tier: dict[str, int]) -> CacheStats:
    """Sum the tiers' occupancy; `counters` holds the cache's num_* counters by field name."""
    entries_by_priority: dict[str, int] = {}
    bytes_by_priority: dict[str, int] = {}
    for stats in tier_stats:
        for name, count in stats.num_entries_by_priority.items():
            entries_by_priority[name] = entries_by_priority.get(name, 0) + count
        for name, count in stats.num_bytes_by_priority.items():
            bytes_by_priority[name] = bytes_by_priority.get(name, 0) + count
    return CacheStats(
        num_saved_tokens=counters["num_hit_tokens"],
        num_entries=sum(s.num_entries for s in tier_stats),
        num_partial_entries=sum(s.num_partial_entries for s in tier_stats),
        num_bytes=sum(s.num_bytes for s in tier_stats),
        budget_bytes=sum(s.budget_bytes for s in tier_stats),
        num_entries_by_priority=entries_by_priority,
        num_bytes_by_priority=bytes_by_priority,
        tokens_by_tier=dict(tokens_by_tier),
        tiers={s.name: s for s in tier_stats},
        **counters,
    )
