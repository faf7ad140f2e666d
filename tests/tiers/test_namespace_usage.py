"""A tier's occupancy by some namespaces only (what a tenant key reads): the disk tier's `usage_of`
counts from its catalog, queued and written entries alike, and agrees with the generic scan."""

from __future__ import annotations

from kvcellar.cache import Priority
from kvcellar.tiers.memory import MemoryTier
from kvcellar.cache.tier import namespace_usage

from .helpers import ROOT_A, ROOT_B, chain, make_partial, open_tier, store


def _entries():
    a = chain(list(range(12)), ROOT_A, Priority.SYSTEM) + [make_partial(ROOT_A, [7, 8], ROOT_A)]
    b = chain(list(range(100, 108)), ROOT_B)
    return a, b


class _WithoutUsageOf:
    """A tier that offers only the protocol's reads (so namespace_usage scans its entries)."""

    def __init__(self, tier) -> None:
        self.name, self.budget_bytes, self.entries = tier.name, tier.budget_bytes, tier.entries


def _summary(stats) -> tuple:
    return (stats.num_entries, stats.num_partial_entries, stats.num_bytes, stats.budget_bytes,
            stats.num_entries_by_priority, stats.num_bytes_by_priority)  # fmt: skip


def test_disk_usage_of_counts_only_the_namespaces_asked(tmp_path):
    a, b = _entries()
    tier = open_tier(tmp_path / "disk")
    try:
        for entry in a + b:
            assert store(tier, entry)
        queued = _summary(tier.usage_of({ROOT_A}))  # some entries may still wait in the write queue
        assert tier.flush(60)
        written = tier.usage_of({ROOT_A})
        assert _summary(written) == queued
        assert (written.num_entries, written.num_partial_entries) == (4, 1)
        assert written.num_entries_by_priority == {"ASSISTANT": 0, "USER": 1, "SYSTEM": 3}
        assert written.num_bytes_by_priority["SYSTEM"] == sum(e.num_bytes for e in a[:3])
        both, whole = tier.usage_of({ROOT_A, ROOT_B}), tier.stats()
        assert (both.num_entries, both.num_bytes) == (whole.num_entries, whole.num_bytes)
        assert tier.usage_of(set()).num_entries == 0
        # The generic scan over entries() (a tier without usage_of) counts the same entries.
        scanned = namespace_usage(_WithoutUsageOf(tier), {ROOT_A})
        assert (scanned.num_entries, scanned.num_partial_entries, scanned.num_entries_by_priority,
                scanned.num_bytes_by_priority) == (4, 1, written.num_entries_by_priority, written.num_bytes_by_priority)
    finally:
        tier.close()


def test_memory_tier_usage_by_namespace(tmp_path):
    a, b = _entries()
    tier = MemoryTier(1 << 20)
    for entry in a + b:
        assert tier.prepare_store(entry).accepted
        tier.complete_store(entry.key)
    usage = namespace_usage(tier, {ROOT_B})
    assert (usage.num_entries, usage.num_partial_entries, usage.num_bytes) == (2, 0, sum(e.num_bytes for e in b))
    assert usage.num_entries_by_priority == {"ASSISTANT": 0, "USER": 2, "SYSTEM": 0}
    assert usage.budget_bytes == 1 << 20
