"""Entries moving between tiers: demotion on eviction, promotion on a hit, write-through, drops, load failures."""

from __future__ import annotations

import dataclasses

import pytest

from kvcellar.cache import NamespaceSpec, PrefixCache, Priority, hash_block, namespace_digest
from kvcellar.tiers.memory import MemoryTier
from kvcellar.cache.cost_model import Segment

from .fakes import ATTENTION, B, ROOT, RecordingObserver, insert_chain, payload

T = list(range(1, 13))  # three blocks


def _two_tiers(device_bytes=100, host_bytes=1000, write_through=(), observer=None, max_tail_entries=8):
    device, host = MemoryTier(device_bytes), MemoryTier(host_bytes, name="host")
    cache = PrefixCache(
        ROOT, ATTENTION, [device, host], observer=observer, write_through=write_through, max_tail_entries=max_tail_entries
    )
    return cache, device, host


def test_a_promoted_hit_restores_from_the_first_tier_copy():
    to_device = lambda p: p if isinstance(p, tuple) else ("on-device", p)  # noqa: E731 - like payload_mover
    to_host = lambda p: p[1] if isinstance(p, tuple) else p  # noqa: E731
    device, host = MemoryTier(30, adopt=to_device), MemoryTier(1000, name="host", adopt=to_host)
    cache = PrefixCache(ROOT, ATTENTION, [device, host])
    insert_chain(cache, T, num_bytes=10)
    cache.set_budget_bytes(0)  # down to the host
    cache.set_budget_bytes(30)
    match = cache.lookup([*T, 0])
    assert match.tokens_by_tier == {"host": 12}
    # The entries are the host's (released there); what to restore from is the device copy, moved once.
    assert [match.payload_of(b) for b in match.blocks] == [("on-device", payload(T[i : i + B])) for i in (0, 4, 8)]
    assert all(not isinstance(b.payload, tuple) for b in match.blocks)
    cache.release(match)


def test_eviction_demotes_to_the_next_tier():
    observer = RecordingObserver()
    cache, device, host = _two_tiers(device_bytes=10, observer=observer)
    old, new = insert_chain(cache, T[:4])[0], insert_chain(cache, [50, 51, 52, 53])[0]
    assert [e.key for e in device.entries()] == [new] and [e.key for e in host.entries()] == [old]
    assert cache.stats().num_demotions == 1 and cache.stats().num_evictions == 1
    demoted = host.entries()[0]
    assert demoted.payload == payload(T[:4]) and demoted.num_pins == 0
    assert ("evict", tuple(T[:4]), "device") in observer.events and ("store", tuple(T[:4]), "host") in observer.events


def test_a_hit_in_a_slower_tier_is_promoted():
    cache, device, host = _two_tiers(device_bytes=30)
    insert_chain(cache, T, num_bytes=10)
    cache.set_budget_bytes(0)  # everything moves down to the host
    assert device.num_entries == 0 and host.num_entries == 3
    cache.set_budget_bytes(30)
    match = cache.lookup([*T, 0])
    assert match.tokens_by_tier == {"host": 12} and [b.payload for b in match.blocks] == [payload(T[i : i + B]) for i in (0, 4, 8)]
    cache.release(match)
    assert device.num_entries == 3 and cache.stats().num_promotions == 3
    assert all(e.num_pins == 0 for tier in cache.tiers for e in tier.entries())
    again = cache.lookup([*T, 0])
    assert again.tokens_by_tier == {"device": 12}
    cache.release(again)


def test_write_through_copies_every_insert_and_survives_a_full_first_tier():
    cache, device, host = _two_tiers(device_bytes=0, write_through=("host",))
    keys = insert_chain(cache, T, num_bytes=10)
    assert len(keys) == 3 and device.num_entries == 0 and host.num_entries == 3
    assert cache.stats().num_demotions == 0  # copies on insert are not demotions
    with pytest.raises(ValueError, match="not tiers after the first"):
        PrefixCache(ROOT, ATTENTION, [MemoryTier(10)], write_through=("disk",))


def test_a_refusal_below_is_a_counted_drop():
    observer = RecordingObserver()
    cache, device, host = _two_tiers(device_bytes=10, host_bytes=0, observer=observer)
    insert_chain(cache, T[:4])
    insert_chain(cache, [50, 51, 52, 53])
    stats = cache.stats()
    assert stats.num_evictions == 1 and stats.num_dropped == 1 and host.num_entries == 0
    assert any(e[0] == "refuse" and e[2].startswith("host:") for e in observer.events)


def test_a_tier_that_does_not_admit_refuses_before_evicting_anything():
    observer = RecordingObserver()
    admitting = {"now": False}
    admit = lambda p: None if admitting["now"] else "no buffer ready"  # noqa: E731 - like pinned_admission
    device, host = MemoryTier(10), MemoryTier(20, name="host", admit=admit)
    cache = PrefixCache(ROOT, ATTENTION, [device, host], observer=observer)
    admitting["now"] = True
    insert_chain(cache, T[:4])
    insert_chain(cache, [50, 51, 52, 53])  # evicts T's block from the device: the host admits it
    assert host.num_entries == 1
    admitting["now"] = False
    insert_chain(cache, [60, 61, 62, 63])  # evicts [50..53]: refused, and the host keeps what it had
    assert host.num_entries == 1 and host.num_bytes == 10
    assert cache.stats().num_dropped == 1
    assert ("refuse", (50, 51, 52, 53), "host: no buffer ready") in observer.events


def test_partials_promoted_from_below_respect_the_count_limit():
    cache, device, host = _two_tiers(device_bytes=1000, max_tail_entries=1)
    for tail in ([7], [8]):
        cache.insert_tail(ROOT, tail, payload(tail), 5, Priority.USER, has_logits=True)
    assert [e.token_ids for e in device.entries()] == [(8,)] and [e.token_ids for e in host.entries()] == [(7,)]
    match = cache.lookup([7])
    assert match.use_logits and match.tokens_by_tier == {"host": 1}
    cache.release(match)
    assert [e.token_ids for e in device.entries()] == [(7,)]  # promoted; [8] was demoted in its place
    assert sorted(e.token_ids for e in host.entries()) == [(7,), (8,)]


class FlakyTier(MemoryTier):
    """A host tier whose stored bytes for one key turn out bad: the load drops the entry and fails."""

    def __init__(self, budget_bytes: int, bad_key: bytes) -> None:
        super().__init__(budget_bytes, name="host")
        self.bad_key = bad_key

    def prepare_load(self, keys):
        keys = list(keys)
        if self.bad_key in keys:
            self.evict(self.bad_key)
            raise KeyError("failed validation")
        return super().prepare_load(keys)


def test_an_entry_that_fails_to_load_shortens_the_match():
    bad = hash_block(hash_block(ROOT, T[:4]), T[4:8])
    host = FlakyTier(1000, bad)
    cache = PrefixCache(ROOT, ATTENTION, [MemoryTier(0), host], write_through=("host",))
    insert_chain(cache, T, num_bytes=10)
    match = cache.lookup([*T, 0])
    assert match.num_tokens == 4 and match.tokens_by_tier == {"host": 4}
    assert cache.stats().num_load_failures == 1 and not host.contains(bad)
    cache.release(match)


def test_an_entry_of_another_namespace_is_never_returned():
    device = MemoryTier(1000)
    cache = PrefixCache(ROOT, ATTENTION, [device])
    key = insert_chain(cache, T[:4])[0]
    other = namespace_digest(NamespaceSpec("another-model", "float32", B, 1, False))
    forged = dataclasses.replace(device.evict(key), namespace=other, num_pins=0)
    device.prepare_store(forged)
    device.complete_store(key)
    match = cache.lookup([*T[:4], 0])
    assert match.num_tokens == 0 and not device.contains(key) and cache.stats().num_load_failures == 1


def test_a_planner_can_cut_the_restore_short():
    cache, device, host = _two_tiers(device_bytes=10, write_through=("host",))
    insert_chain(cache, T, num_bytes=10)  # all on the host; the device kept the last block (the first was a leaf there)
    seen = []

    def planner(segments, num_rest_tokens):
        seen.append((segments, num_rest_tokens))
        return 1

    match = cache.lookup([*T, 0], planner=planner)
    assert match.num_tokens == 4 and len(match.blocks) == 1
    assert seen == [([Segment("host", 10, 4), Segment("host", 10, 4), Segment("device", 10, 4)], 1)]
    cache.release(match)
    assert cache.lookup([*T, 0], planner=lambda s, n: 0).num_tokens == 0


def test_probe_loads_nothing_and_counts_nothing():
    cache, device, host = _two_tiers(device_bytes=10, write_through=("host",))
    insert_chain(cache, T, num_bytes=10)
    assert cache.probe([*T, 0]) == (12, {"host": 8, "device": 4})
    assert cache.stats().num_lookups == 0 and cache.stats().num_promotions == 0
    assert all(e.num_pins == 0 for tier in cache.tiers for e in tier.entries())
