"""The observer is wired: the registry hands its one observer to every core; LoggingObserver's lines."""

from __future__ import annotations

import logging

from kvcellar.cache import NamespaceSpec
from kvcellar.cache.observer import LoggingObserver
from kvcellar.cache.registry import CacheRegistry
from kvcellar.tiers.memory import MemoryTier

from .fakes import ATTENTION, B, RecordingObserver, insert_chain, make_cache


def test_every_core_of_a_registry_reports_to_its_observer() -> None:
    observer = RecordingObserver()
    spec = NamespaceSpec("test-model", "float32", B, 1, True)
    registry = CacheRegistry(spec, ATTENTION, [MemoryTier(1000)], 8, observer=observer)
    insert_chain(registry.core_for_salt(""), [1, 2, 3, 4])
    insert_chain(registry.core_for_salt("tenant-b"), [5, 6, 7, 8])
    assert observer.events == [("store", (1, 2, 3, 4), "device"), ("store", (5, 6, 7, 8), "device")]


def test_logging_observer_logs_refusals_and_evictions_at_debug(caplog) -> None:
    logger = logging.getLogger("kvcellar.cache.test")
    cache = make_cache(budget_bytes=20, observer=LoggingObserver(logger))
    with caplog.at_level(logging.DEBUG, logger=logger.name):
        for block in ([1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]):  # three one-block chains: the third evicts the first
            insert_chain(cache, block, num_bytes=10)
        insert_chain(cache, [20, 21, 22, 23], num_bytes=30)  # larger than the tier: refused
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("evicted block ") and lines[0].endswith("from device (4 tokens, 10 bytes, USER)")
    assert lines[1].startswith("not stored: block ") and "(4 tokens, 30 bytes)" in lines[1] and "exceeds" in lines[1]


def test_logging_observer_is_silent_above_debug(caplog) -> None:
    logger = logging.getLogger("kvcellar.cache.test")
    cache = make_cache(budget_bytes=20, observer=LoggingObserver(logger))
    with caplog.at_level(logging.INFO, logger=logger.name):
        for block in ([1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [20, 21, 22, 23]):
            insert_chain(cache, block, num_bytes=10 if block[0] < 20 else 30)  # an eviction, then a refusal
    assert caplog.records == []
