"""A frozen snapshot of prefix-cache counters and occupancy.

Operations: `CacheStats` (the snapshot; `hit_rate`) and `snapshot` (built
from resident entries plus the cache's running counters). Counters are
cumulative since the cache was created; occupancy is summed over tiers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kvcellar.cache.entry import CacheEntry, Priority


@dataclass(frozen=True)
class CacheStats:
    num_lookups: int
    num_hit_tokens: int  # prompt tokens restored instead of computed
    num_miss_tokens: int  # prompt tokens left to compute
    num_saved_tokens: int  # = num_hit_tokens (prefill tokens the cache saved)
    num_evictions: int  # entries removed for space or for the partial count limit
    num_discards: int  # entries removed by discard() (failed validation)
    num_entries: int
    num_partial_entries: int
    num_bytes: int  # resident + reserved, summed over tiers
    budget_bytes: int  # summed over tiers
    num_entries_by_priority: dict[str, int]  # Priority name -> resident entries
    num_bytes_by_priority: dict[str, int]  # Priority name -> resident bytes
    tokens_by_tier: dict[str, int]  # tier name -> restored tokens

    @property
    def hit_rate(self) -> float:
        """Fraction of looked-up prompt tokens that were restored (0.0 before any lookup)."""
        total = self.num_hit_tokens + self.num_miss_tokens
        return self.num_hit_tokens / total if total else 0.0


def snapshot(
    *,
    entries: Iterable[CacheEntry],
    num_lookups: int,
    num_hit_tokens: int,
    num_miss_tokens: int,
    num_evictions: int,
    num_discards: int,
    num_bytes: int,
    budget_bytes: int,
    tokens_by_tier: dict[str, int],
) -> CacheStats:
    entries_by_priority = {priority.name: 0 for priority in Priority}
    bytes_by_priority = {priority.name: 0 for priority in Priority}
    num_entries = num_partial_entries = 0
    for entry in entries:
        num_entries += 1
        num_partial_entries += entry.is_partial
        entries_by_priority[entry.priority.name] += 1
        bytes_by_priority[entry.priority.name] += entry.num_bytes
    return CacheStats(
        num_lookups=num_lookups,
        num_hit_tokens=num_hit_tokens,
        num_miss_tokens=num_miss_tokens,
        num_saved_tokens=num_hit_tokens,
        num_evictions=num_evictions,
        num_discards=num_discards,
        num_entries=num_entries,
        num_partial_entries=num_partial_entries,
        num_bytes=num_bytes,
        budget_bytes=budget_bytes,
        num_entries_by_priority=entries_by_priority,
        num_bytes_by_priority=bytes_by_priority,
        tokens_by_tier=dict(tokens_by_tier),
    )
