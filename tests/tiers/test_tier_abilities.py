"""Optional tier abilities are typed protocols (cache/tier.py), asked with isinstance: which tier has which."""

from __future__ import annotations

import pytest

from kvcellar.cache.registry import CacheRegistry
from kvcellar.cache.tier import (BackgroundHelper, BackgroundWriter, NamespaceUsage, PersistentTier, Tier,
                                 check_known_tier)  # fmt: skip
from kvcellar.errors import UnknownTierError
from kvcellar.tiers.codec import RawCodec
from kvcellar.tiers.disk.tier import DiskTier
from kvcellar.tiers.memory import MemoryTier


def test_the_disk_tier_declares_its_abilities_and_a_memory_tier_none(tmp_path) -> None:
    disk = DiskTier(tmp_path / "kv", 1 << 20, RawCodec())
    memory = MemoryTier(1 << 20)
    try:
        abilities = (BackgroundWriter, PersistentTier, NamespaceUsage)
        assert isinstance(disk, Tier) and all(isinstance(disk, ability) for ability in abilities)
        assert isinstance(memory, Tier) and not any(isinstance(memory, ability) for ability in abilities)
        assert not isinstance(memory, BackgroundHelper)
    finally:
        disk.close()


class _Helper:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def pause(self, active: bool) -> None:
        self.calls.append(("pause", active))

    def flush(self, timeout_s: float | None = None) -> bool:
        self.calls.append(("flush", timeout_s))
        return True

    def close(self) -> None:
        self.calls.append(("close", None))


def test_registry_defers_only_background_writers_and_pauses_its_helpers(tmp_path) -> None:
    disk = DiskTier(tmp_path / "kv", 1 << 20, RawCodec())
    helper = _Helper()
    assert isinstance(helper, BackgroundHelper)
    deferred: list[bool] = []
    disk.defer_writes = deferred.append  # a spy; the memory tier has nothing to defer and is not asked
    registry = CacheRegistry(None, None, [MemoryTier(1 << 20), disk], helpers=[helper])
    with registry.computing():
        assert deferred == [True]
    assert deferred == [True, False]
    with registry.serving():
        assert helper.calls == [("pause", True)]
    report = registry.close(5.0)
    assert helper.calls == [("pause", True), ("pause", False), ("close", None)]
    assert (report.has_disk_tier, report.num_written, report.num_dropped) == (True, 0, 0)


def test_check_known_tier_names_the_tiers_there_are() -> None:
    check_known_tier(None, ["device"])  # None means every tier
    check_known_tier("disk", ["device", "disk"])
    with pytest.raises(UnknownTierError, match=r"unknown cache tier 'ssd'; tiers: device, disk"):
        check_known_tier("ssd", ["device", "disk"])
    with pytest.raises(ValueError, match=r"tiers: none \(the cache is off\)"):
        check_known_tier("device", [])
