"""What the engine tells about its cache: one typed snapshot (`CacheReport`), probes.

Operations: `cache_report(registry) -> CacheReport` (everything),
`namespace_report(registry, salts) -> CacheReport` (the salts a filter
accepts), `CacheReport.as_json()` (the cache part of GET /v1/cache/stats,
docs/api.md), `ProbeResult`.

Counters are summed over tenant salts (each salt has its own core over the
shared tiers); occupancy is read from the tiers themselves, once. A
namespace report covers only the salts a filter accepts: their counters and
the entries of their namespaces in each tier; it has no evictions, discards,
media counters or tenant count (None), since those belong to the shared tiers
and an eviction of one namespace's entry is often caused by another's store.
Every reader (the Prometheus collector, the stats route, the dashboard
through it, library callers) reads this one snapshot, never a dict by key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from kvcellar.cache.registry import CacheRegistry
from kvcellar.cache.stats import CacheStats
from kvcellar.cache.tier import TierStats, namespace_usage


@dataclass(frozen=True)
class ProbeResult:
    """How much of a prompt the cache holds right now, per tier (nothing is run or pinned afterwards)."""

    num_prompt_tokens: int
    num_cached_tokens: int
    tokens_by_tier: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class TierReport:
    """One tier's occupancy, plus its medium's own counters (write-behind drops, corrupt files, load rates)."""

    num_bytes: int
    budget_bytes: int
    num_entries: int
    counters: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict:
        return {"bytes": self.num_bytes, "budget_bytes": self.budget_bytes, "entries": self.num_entries, **self.counters}


@dataclass(frozen=True)
class PriorityUsage:
    num_entries: int
    num_bytes: int

    def as_json(self) -> dict:
        return {"entries": self.num_entries, "bytes": self.num_bytes}


@dataclass(frozen=True, kw_only=True)
class CacheReport:
    """Cumulative counters and current occupancy of a cache (or of some namespaces of it)."""

    enabled: bool
    disabled_reason: str | None
    num_lookups: int
    num_hit_tokens: int
    num_miss_tokens: int
    num_saved_tokens: int
    num_evictions: int | None  # None in a namespace report (shared tiers' figure)
    num_discards: int | None  # likewise
    tiers: dict[str, TierReport]  # fastest first
    by_priority: dict[str, PriorityUsage]  # Priority name -> resident entries and payload bytes
    hit_tokens_by_tier: dict[str, int]  # restored tokens, by the tier they came from
    num_tenants: int | None = None  # salts in use; None in a namespace report

    @property
    def hit_rate(self) -> float:
        """Fraction of looked-up prompt tokens that were restored (0.0 before any lookup)."""
        looked_up = self.num_hit_tokens + self.num_miss_tokens
        return self.num_hit_tokens / looked_up if looked_up else 0.0

    @property
    def num_entries(self) -> int:
        return sum(tier.num_entries for tier in self.tiers.values())

    @property
    def num_bytes(self) -> int:
        return sum(tier.num_bytes for tier in self.tiers.values())

    def as_json(self) -> dict:
        """The JSON names docs/api.md documents; a namespace report leaves out what it does not have."""
        totals = {"lookups": self.num_lookups, "hit_tokens": self.num_hit_tokens, "miss_tokens": self.num_miss_tokens,
                  "saved_tokens": self.num_saved_tokens}  # fmt: skip
        if self.num_evictions is not None:
            totals["evictions"] = self.num_evictions
        if self.num_discards is not None:
            totals["discards"] = self.num_discards
        report = {
            "enabled": self.enabled,
            "disabled_reason": self.disabled_reason,
            **totals,
            "hit_rate": self.hit_rate,
            "entries": self.num_entries,
            "bytes": self.num_bytes,
            "tiers": {name: tier.as_json() for name, tier in self.tiers.items()},
            "by_priority": {name: usage.as_json() for name, usage in self.by_priority.items()},
            "hit_tokens_by_tier": dict(self.hit_tokens_by_tier),
        }
        if self.num_tenants is not None:
            report["tenants"] = self.num_tenants
        return report


def cache_report(registry: CacheRegistry) -> CacheReport:
    snapshots = registry.stats()
    tiers = {}
    for tier in registry.tiers:
        counters = tier.stats().counters
        tiers[tier.name] = TierReport(tier.num_bytes, tier.budget_bytes, tier.num_entries,
                                      {name: value for name, value in counters.items() if name not in ("bytes", "entries")})  # fmt: skip
    by_priority: dict[str, PriorityUsage] = {}
    if snapshots:  # every core sees the same shared tiers: occupancy by priority from one of them
        first = snapshots[0]
        by_priority = {name: PriorityUsage(count, first.num_bytes_by_priority.get(name, 0))
                       for name, count in first.num_entries_by_priority.items()}  # fmt: skip
    return _report(registry, snapshots, tiers, by_priority, num_evictions=sum(s.num_evictions for s in snapshots),
                   num_discards=sum(s.num_discards for s in snapshots), num_tenants=len(snapshots))  # fmt: skip


def namespace_report(registry: CacheRegistry, salts: Callable[[str], bool]) -> CacheReport:
    """What the salts accepted by `salts` did and hold: lookups, hit / miss / saved tokens and hit rate,
    entries and bytes per tier and per priority, restored tokens per tier."""
    cores = registry.cores_of(salts)
    snapshots = [core.stats() for core in cores]
    roots = {core.root for core in cores}
    usages: list[TierStats] = [namespace_usage(tier, roots) for tier in registry.tiers]
    tiers = {u.name: TierReport(u.num_bytes, u.budget_bytes, u.num_entries) for u in usages}
    entries: dict[str, int] = {}
    payload: dict[str, int] = {}
    for usage in usages:
        for name, count in usage.num_entries_by_priority.items():
            entries[name] = entries.get(name, 0) + count
            payload[name] = payload.get(name, 0) + usage.num_bytes_by_priority.get(name, 0)
    by_priority = {name: PriorityUsage(entries[name], payload[name]) for name in entries}
    return _report(registry, snapshots, tiers, by_priority, num_evictions=None, num_discards=None, num_tenants=None)


def _report(registry: CacheRegistry, snapshots: list[CacheStats], tiers: dict[str, TierReport],
            by_priority: dict[str, PriorityUsage], **shared: int | None) -> CacheReport:  # fmt: skip
    """The parts every report shares: lookup totals and restored tokens per tier, summed over `snapshots`."""
    tokens_by_tier: dict[str, int] = {}
    for snap in snapshots:
        for name, count in snap.tokens_by_tier.items():
            tokens_by_tier[name] = tokens_by_tier.get(name, 0) + count
    return CacheReport(
        enabled=registry.uncacheable_reason is None,
        disabled_reason=registry.uncacheable_reason,
        num_lookups=sum(s.num_lookups for s in snapshots),
        num_hit_tokens=sum(s.num_hit_tokens for s in snapshots),
        num_miss_tokens=sum(s.num_miss_tokens for s in snapshots),
        num_saved_tokens=sum(s.num_saved_tokens for s in snapshots),
        tiers=tiers,
        by_priority=by_priority,
        hit_tokens_by_tier=tokens_by_tier,
        **shared,
    )
