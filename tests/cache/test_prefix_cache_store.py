"""PrefixCache inserts, discard, clear, budgets, stats and observer events."""

import threading

import pytest

from kvcellar.cache import CacheStats, Priority, TierStats, hash_block

from .fakes import B, RecordingObserver, insert_chain, make_cache, payload

T = list(range(1, 13))


def test_block_with_missing_parent_is_refused() -> None:
    observer = RecordingObserver()
    cache = make_cache(observer=observer)
    orphan_parent = hash_block(cache.root, [9, 9, 9, 9])
    assert cache.insert_block(orphan_parent, T[:4], "x", 10, Priority.USER) is None
    assert observer.events[-1][0] == "refuse" and "not a resident block" in observer.events[-1][2]
    partial_key = cache.insert_tail(cache.root, [1], "p", 5, Priority.USER)
    assert partial_key is not None
    assert cache.insert_block(partial_key, T[:4], "x", 10, Priority.USER) is None  # a partial is no parent
    assert cache.stats().num_entries == 1


def test_existing_block_is_touched_and_priority_raised() -> None:
    observer = RecordingObserver()
    cache = make_cache(observer=observer)
    key = cache.insert_block(cache.root, T[:4], "first", 10, Priority.USER)
    assert cache.insert_block(cache.root, T[:4], "second", 10, Priority.SYSTEM) == key
    entry = cache.tiers[0].get(key)
    assert entry is not None and entry.payload == "first" and entry.priority is Priority.SYSTEM
    assert cache.stats().num_bytes == 10
    assert [event[0] for event in observer.events] == ["store"]


def test_inserts_evict_and_report() -> None:
    observer = RecordingObserver()
    cache = make_cache(budget_bytes=20, observer=observer)
    for first in (10, 20, 30):
        cache.insert_block(cache.root, [first, 0, 0, 0], payload([first]), 10, Priority.USER)
    assert observer.events[-2:] == [("evict", (10, 0, 0, 0), "device"), ("store", (30, 0, 0, 0), "device")]
    assert cache.stats().num_evictions == 1 and cache.stats().num_bytes == 20
    assert cache.insert_block(cache.root, [40, 0, 0, 0], "big", 21, Priority.SYSTEM) is None
    assert "exceeds" in observer.events[-1][2] and cache.stats().num_entries == 2


def test_tier_names() -> None:
    cache = make_cache()
    assert cache.insert_block(cache.root, T[:4], "x", 1, Priority.USER, tier_name="device") is not None
    with pytest.raises(ValueError, match="no tier named 'disk'"):
        cache.insert_block(cache.root, T[:4], "x", 1, Priority.USER, tier_name="disk")
    with pytest.raises(ValueError, match="no tier named"):
        cache.clear("disk")


def test_discard_evicts_only_that_entry() -> None:
    cache = make_cache()
    keys = insert_chain(cache, T)
    cache.insert_tail(keys[2], [0], "tail", 5, Priority.USER)
    assert cache.discard(keys[1])
    assert not cache.discard(keys[1])
    tier = cache.tiers[0]
    assert [tier.contains(key) for key in keys] == [True, False, True]
    assert cache.stats().num_entries == 3 and cache.stats().num_discards == 1 and cache.stats().num_evictions == 0
    match = cache.lookup([*T, 0, 5])
    assert match.num_tokens == B  # the chain stops at the discarded block
    cache.release(match)
    insert_chain(cache, T[:8])  # recomputed block 1 reconnects the rest of the chain
    match = cache.lookup([*T, 0, 5])
    assert match.num_tokens == 13 and match.tail is not None and match.tail.payload == "tail"
    cache.release(match)


def test_release_after_discard_does_not_unpin_a_new_entry() -> None:
    cache = make_cache()
    keys = insert_chain(cache, T[:8])
    stale = cache.lookup([*T[:8], 0])
    cache.discard(keys[1])
    insert_chain(cache, T[:8])
    fresh = cache.lookup([*T[:8], 0])
    cache.release(stale)  # the discarded object is skipped
    assert [entry.num_pins for entry in fresh.blocks] == [1, 1]
    cache.release(fresh)
    assert [entry.num_pins for entry in fresh.blocks] == [0, 0]


def test_clear() -> None:
    cache = make_cache(max_tail_entries=1)
    insert_chain(cache, T)
    cache.insert_tail(cache.root, [1], "p", 5, Priority.USER)
    cache.clear()
    assert cache.stats().num_entries == 0 and cache.stats().num_bytes == 0
    assert cache.lookup(T).num_tokens == 0
    assert cache.insert_tail(cache.root, [2], "p", 5, Priority.USER) is not None
    cache.clear("device")
    assert cache.tiers[0].num_entries == 0 and cache.stats().num_evictions == 0


def test_stats_are_exact() -> None:
    cache = make_cache()
    keys = insert_chain(cache, T[:8], num_bytes=10, priority=Priority.SYSTEM)
    cache.insert_tail(keys[1], [9, 10], "tail", 5, Priority.ASSISTANT)
    cache.release(cache.lookup([*T[:10], 0]))  # 10 hit, 1 miss
    cache.release(cache.lookup([99, 98]))  # 2 miss
    stats = cache.stats()
    assert stats == CacheStats(
        num_lookups=2, num_hit_tokens=10, num_miss_tokens=3, num_saved_tokens=10, num_evictions=0, num_discards=0,
        num_entries=3, num_partial_entries=1, num_bytes=25, budget_bytes=10_000,
        num_entries_by_priority={"ASSISTANT": 1, "USER": 0, "SYSTEM": 2},
        num_bytes_by_priority={"ASSISTANT": 5, "USER": 0, "SYSTEM": 20},
        tokens_by_tier={"device": 10},
        tiers={"device": TierStats(
            "device", 3, 1, 25, 10_000, {"ASSISTANT": 1, "USER": 0, "SYSTEM": 2}, {"ASSISTANT": 5, "USER": 0, "SYSTEM": 20}
        )},
    )  # fmt: skip
    assert stats.hit_rate == pytest.approx(10 / 13)
    cache.set_budget_bytes(20)  # the ASSISTANT tail is the lowest-priority leaf
    cache.discard(keys[1])
    stats = cache.stats()
    assert (stats.num_evictions, stats.num_discards, stats.num_entries, stats.num_bytes, stats.budget_bytes) == (1, 1, 1, 10, 20)
    assert stats.num_partial_entries == 0


def test_observer_sees_lookups() -> None:
    observer = RecordingObserver()
    cache = make_cache(observer=observer)
    insert_chain(cache, T[:4])
    cache.release(cache.lookup([*T[:4], 7]))
    assert observer.events == [("store", tuple(T[:4]), "device"), ("lookup", 4, 5)]


def test_concurrent_use_keeps_invariants() -> None:
    cache = make_cache(budget_bytes=60)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for step in range(200):
                prompt = [(seed * 7 + step * i) % 5 for i in range(10)]
                insert_chain(cache, prompt, num_bytes=10)
                cache.insert_tail(cache.root, prompt[:2], "p", 3, Priority.USER)
                match = cache.lookup(prompt)
                cache.release(match)
        except BaseException as error:  # reported to the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    tier = cache.tiers[0]
    assert tier.num_bytes <= 60 and tier.num_bytes == sum(e.num_bytes for e in tier.entries())
    assert all(entry.num_pins == 0 for entry in tier.entries())
