"""What the engine tells about its cache: a JSON-ready report, probes, budget changes.

Operations: `cache_report(registry) -> dict`, `namespace_report(registry,
salts) -> dict`, `ProbeResult`. Counters are summed over tenant salts (each
salt has its own core over the shared tiers); occupancy is read from the
tiers themselves, once. A namespace report covers only the salts a filter
accepts: their counters, and the entries of their namespaces in each tier.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from kvcellar.cache.tier import namespace_usage



@dataclass(frozen=True)
class ProbeResult:
    """How much of a prompt the cache holds right now, per tier (nothing is run or pinned afterwards)."""

    num_prompt_tokens: int
    num_cached_tokens: int
    tokens_by_tier: dict[str, int] = field(default_factory=dict)


def cache_report(registry: object) -> dict:
    snapshots = registry.stats()
    totals = {
        "lookups": sum(s.num_lookups for s in snapshots),
        "hit_tokens": sum(s.num_hit_tokens for s in snapshots),
        "miss_tokens": sum(s.num_miss_tokens for s in snapshots),
        "saved_tokens": sum(s.num_saved_tokens for s in snapshots),
        "evictions": sum(s.num_evictions for s in snapshots),
        "discards": sum(s.num_discards for s in snapshots),
    }
    tiers = {}
    for tier in registry.tiers:
        # The medium's own counters too: write-behind drops, corrupt files, load bandwidth (disk).
        counters = tier.stats().counters
        tiers[tier.name] = {"bytes": tier.num_bytes, "budget_bytes": tier.budget_bytes, "entries": tier.num_entries,
                            **{name: value for name, value in counters.items() if name not in ("bytes", "entries")}}
    by_priority: dict[str, dict[str, int]] = {}
    if snapshots:  # every core sees the same shared tiers: occupancy by priority from one of them
        first = snapshots[0]
        by_priority = {
            name: {"entries": first.num_entries_by_priority.get(name, 0), "bytes": first.num_bytes_by_priority.get(name, 0)}
            for name in first.num_entries_by_priority
        }
    return {**_lookup_report(registry, snapshots, totals, tiers, by_priority), "tenants": len(snapshots)}


def namespace_report(registry: object, salts: Callable[[str], bool]) -> dict:
    """What the salts accepted by `salts` did and hold: lookups, hit / miss / saved tokens and hit rate,
    entries and bytes per tier and per priority, restored tokens per tier.

    Evictions and the media's counters (drops, corrupt files) are left out: they belong to the shared
    tiers, and an eviction of one namespace's entry is often caused by another's store.
    """
    cores = registry.cores_of(salts)
    snapshots = [core.stats() for core in cores]
    totals = {
        "lookups": sum(s.num_lookups for s in snapshots),
        "hit_tokens": sum(s.num_hit_tokens for s in snapshots),
        "miss_tokens": sum(s.num_miss_tokens for s in snapshots),
        "saved_tokens": sum(s.num_saved_tokens for s in snapshots),
    }
    roots = {core.root for core in cores}
    usages = [namespace_usage(tier, roots) for tier in registry.tiers]
    tiers = {u.name: {"bytes": u.num_bytes, "budget_bytes": u.budget_bytes, "entries": u.num_entries} for u in usages}
    by_priority: dict[str, dict[str, int]] = {}
    for usage in usages:
        for name, count in usage.num_entries_by_priority.items():
            into = by_priority.setdefault(name, {"entries": 0, "bytes": 0})
            into["entries"] += count
            into["bytes"] += usage.num_bytes_by_priority.get(name, 0)
    return _lookup_report(registry, snapshots, totals, tiers, by_priority)


def _lookup_report(registry: object, snapshots: list, totals: dict[str, int], tiers: dict[str, dict],
                   by_priority: dict[str, dict[str, int]]) -> dict:  # fmt: skip
    """The report's common shape: totals with their hit rate, occupancy, restored tokens per tier."""
    looked_up = totals["hit_tokens"] + totals["miss_tokens"]
    tokens_by_tier: dict[str, int] = {}
    for snap in snapshots:
        for name, count in snap.tokens_by_tier.items():
            tokens_by_tier[name] = tokens_by_tier.get(name, 0) + count
    return {
        "enabled": registry.uncacheable_reason is None,
        "disabled_reason": registry.uncacheable_reason,
        **totals,
        "hit_rate": totals["hit_tokens"] / looked_up if looked_up else 0.0,
        "entries": sum(t["entries"] for t in tiers.values()),
        "bytes": sum(t["bytes"] for t in tiers.values()),
        "tiers": tiers,
        "by_priority": by_priority,
        "hit_tokens_by_tier": tokens_by_tier,
    }
