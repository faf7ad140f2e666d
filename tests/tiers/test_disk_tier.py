"""DiskTier behaviour with raw-bytes payloads: restart recovery, write-behind visibility, eviction, drops."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvcellar.cache import LayoutCapabilities, PrefixCache, Priority, Tier
from kvcellar.tiers.memory import MemoryTier
from kvcellar.tiers.disk.files import CacheDirError

from .helpers import (
    B, ROOT_A, ROOT_B, chain, check_consistent, entry_files, file_of, index_share, make_block, make_partial, open_tier,
    payload_for, store,
)  # fmt: skip

REPO = Path(__file__).resolve().parents[2]
S, U, A = Priority.SYSTEM, Priority.USER, Priority.ASSISTANT
CHILD = """
import hashlib, json, sys
from kvcellar.tiers.codec import RawCodec
from kvcellar.tiers.disk.tier import DiskTier
tier = DiskTier(sys.argv[1], 1 << 20, RawCodec())
found = {}
for entry in tier.entries():
    (loaded,) = tier.prepare_load([entry.key])
    found[entry.key.hex()] = {name: hashlib.sha256(data).hexdigest() for name, data in loaded.payload.items()}
print(json.dumps({"found": found, "counters": tier.stats().counters}))
tier.close()
"""


def _digests(entry) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in entry.payload.items()}


def test_disk_tier_speaks_the_protocol(tmp_path):
    tier = open_tier(tmp_path / "kv")
    assert isinstance(tier, Tier) and tier.name == "disk"
    with pytest.raises(CacheDirError, match="in use"):
        open_tier(tmp_path / "kv")  # one process, one open tier per directory
    tier.close()
    tier.close()  # idempotent
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a cache")
    with pytest.raises(CacheDirError, match="not a kvcellar cache"):
        open_tier(tmp_path / "mine")


def test_restart_in_a_new_process_finds_every_entry_byte_for_byte(tmp_path):
    tier = open_tier(tmp_path / "kv")
    entries = chain(range(20)) + chain(range(100, 108), root=ROOT_B)
    entries.append(make_partial(entries[1].key, [7, 7], has_logits=True))
    entries.append(make_block(entries[4].key, [5, 5, 5, 5], stepped=True))  # keyed as prefilled after the last chunk
    for entry in entries:
        assert store(tier, entry)
    tier.close()  # flushes the queue
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "kv")], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["found"] == {entry.key.hex(): _digests(entry) for entry in entries}
    assert report["counters"]["num_loads"] == len(entries) and report["counters"]["num_corrupt"] == 0
    assert report["counters"]["num_orphans_indexed"] == report["counters"]["num_missing_dropped"] == 0


def test_queued_entries_are_visible_before_their_file_exists(tmp_path):
    tier = open_tier(tmp_path / "kv", start_writer=False)
    first, second = chain(range(8))
    assert store(tier, first) and store(tier, second)
    assert entry_files(tmp_path / "kv") == []
    assert tier.contains(second.key) and tier.get(second.key).token_ids == (4, 5, 6, 7)
    assert [child.key for child in tier.children(first.key)] == [second.key]
    (loaded,) = tier.prepare_load([second.key])
    assert loaded.payload == payload_for(second.key)
    assert tier.stats().counters["num_loads_from_queue"] == 1
    tier.start()
    assert tier.flush(10)
    assert len(entry_files(tmp_path / "kv")) == 2 and check_consistent(tier) == 2
    tier.close()


def test_queue_full_drops_are_counted_and_reported(tmp_path):
    tier = open_tier(tmp_path / "kv", start_writer=False, max_queue_entries=2)
    entries = chain(range(12))
    assert [store(tier, e) for e in entries] == [True, True, False]
    result = tier.prepare_store(entries[2])
    assert not result.accepted and "queue full" in result.reason
    counters = tier.stats().counters
    assert counters["num_dropped_queue_full"] == 2 and counters["num_dropped"] == 2
    assert counters["num_queued"] == 2
    tier.start()
    tier.close()


def test_requests_see_the_disk_through_the_prefix_cache(tmp_path):
    disk = open_tier(tmp_path / "kv")
    device = MemoryTier(3000)
    cache = PrefixCache(ROOT_A, LayoutCapabilities(B, False, None), [device, disk], write_through=("disk",))
    tokens = list(range(24))
    parent = ROOT_A
    for entry in chain(tokens):
        parent = cache.insert_block(parent, entry.token_ids, entry.payload, entry.num_bytes, entry.priority)
    assert disk.num_entries == 6 and device.num_entries < 6  # everything written through, the device is full
    match = cache.lookup([*tokens, 99])
    assert match.num_tokens == 24 and set(match.tokens_by_tier) == {"device", "disk"}
    assert [block.payload for block in match.blocks] == [payload_for(e.key) for e in chain(tokens)]
    cache.release(match)
    assert 1 <= cache.stats().num_promotions <= match.tokens_by_tier["disk"] // B  # as many as the device fits
    assert device.num_bytes <= 3000
    again = cache.lookup([*tokens, 99])
    assert again.tokens_by_tier.get("device", 0) > match.tokens_by_tier["device"]  # promoted entries hit in memory
    cache.release(again)
    disk.close()


def test_eviction_takes_leaves_in_priority_then_lru_order(tmp_path):
    tier = open_tier(tmp_path / "kv")
    parent_a, child_a = chain([1, 1, 1, 1, 2, 2, 2, 2], priority=A)
    system = make_block(ROOT_A, [3, 3, 3, 3], priority=S)
    user_old, user_new = make_block(ROOT_A, [4, 4, 4, 4]), make_block(ROOT_A, [5, 5, 5, 5])
    for entry in (parent_a, child_a, system, user_old, user_new):
        assert store(tier, entry)
    assert tier.flush(10)
    tier.touch([user_old.key])  # user_old is now more recent than user_new
    sizes = {e.key: file_of(tier, e).stat().st_size for e in (parent_a, child_a, system, user_old, user_new)}
    assert tier.num_bytes == sum(sizes.values())
    evicted = tier.set_budget(sizes[system.key] + index_share(tier))
    # Leaves only: the ASSISTANT parent goes after its child; SYSTEM outlives every USER entry.
    assert [e.key for e in evicted] == [child_a.key, parent_a.key, user_new.key, user_old.key]
    assert [e.key for e in tier.entries()] == [system.key]
    assert tier.flush(10) and [p.name[:64] for p in entry_files(tmp_path / "kv")] == [system.key.hex()]
    tier.close()


def test_store_reserves_room_and_protects_the_parent(tmp_path):
    first, second = chain(range(8))
    probe = open_tier(tmp_path / "probe")
    assert store(probe, first) and store(probe, second) and probe.flush(10)
    size_first, size_second = file_of(probe, first).stat().st_size, file_of(probe, second).stat().st_size
    probe.close()
    tier = open_tier(tmp_path / "kv")
    assert store(tier, first) and tier.flush(10)
    tier.set_budget(max(size_first, size_second) + 10 + index_share(tier))  # room for one file beside the index
    result = tier.prepare_store(second)  # needs first's room, but first is its parent
    assert not result.accepted and "cannot free" in result.reason
    too_big = open_tier(tmp_path / "small", budget_bytes=100)
    result = too_big.prepare_store(first)
    assert not result.accepted and "exceeds the disk budget" in result.reason
    too_big.close()
    tier.close()


def test_tail_with_logits_supersedes_the_tail_without(tmp_path):
    tier = open_tier(tmp_path / "kv")
    plain, with_logits = make_partial(ROOT_A, [1, 2]), make_partial(ROOT_A, [1, 2], has_logits=True)
    assert store(tier, plain) and tier.flush(10)
    assert tier.prepare_store(plain).reason == "already stored"
    assert store(tier, with_logits) and tier.flush(10)
    (loaded,) = tier.prepare_load([plain.key])
    assert loaded.has_logits and loaded.payload["logits"] == b"\x01" * 64
    assert len(entry_files(tmp_path / "kv")) == 1 and check_consistent(tier) == 1
    tier.close()


def test_evict_and_clear_remove_files_and_rows(tmp_path):
    tier = open_tier(tmp_path / "kv")
    entries = chain(range(16))
    for entry in entries:
        store(tier, entry)
    assert tier.flush(10)
    assert tier.evict(entries[1].key).key == entries[1].key  # explicit: even a parent goes
    assert tier.flush(10) and not file_of(tier, entries[1]).exists() and check_consistent(tier) == 3
    tier.clear()
    assert tier.flush(10) and tier.num_entries == 0 and tier.num_bytes == 0 and entry_files(tmp_path / "kv") == []
    tier.close()
    assert open_tier(tmp_path / "kv").num_entries == 0


def test_two_namespaces_never_read_each_other(tmp_path):
    disk = open_tier(tmp_path / "kv")
    caps = LayoutCapabilities(B, False, None)
    cache_a = PrefixCache(ROOT_A, caps, [MemoryTier(0), disk], write_through=("disk",))
    cache_b = PrefixCache(ROOT_B, caps, [MemoryTier(0), disk], write_through=("disk",))
    tokens = list(range(12))
    parent = ROOT_A
    for entry in chain(tokens, ROOT_A):
        parent = cache_a.insert_block(parent, entry.token_ids, entry.payload, entry.num_bytes, entry.priority)
    assert parent is not None and disk.flush(10)
    assert cache_b.lookup([*tokens, 1]).num_tokens == 0  # same tokens, other namespace: a miss
    assert cache_a.lookup([*tokens, 1]).num_tokens == 12
    folders = {p.parent.parent.name for p in entry_files(tmp_path / "kv")}
    assert folders == {ROOT_A.hex()[:16]}
    disk.close()


def test_the_next_request_sees_a_block_before_its_write_even_with_no_device_room(tmp_path):
    disk = open_tier(tmp_path / "kv", start_writer=False, max_queue_entries=3)  # the writer is stalled
    cache = PrefixCache(ROOT_A, LayoutCapabilities(B, False, None), [MemoryTier(0), disk], write_through=("disk",))
    tokens = list(range(16))
    parent = ROOT_A
    for entry in chain(tokens):
        parent = cache.insert_block(parent, entry.token_ids, entry.payload, entry.num_bytes, entry.priority) or parent
    match = cache.lookup([*tokens, 1])  # at once: served from the queued payloads
    assert match.num_tokens == 12 and match.tokens_by_tier == {"disk": 12}
    assert [b.payload for b in match.blocks] == [payload_for(e.key) for e in chain(tokens)[:3]]
    cache.release(match)
    stats = cache.stats()
    assert stats.num_dropped == 1 and stats.tiers["disk"].counters["num_dropped_queue_full"] == 1  # the 4th block
    disk.start()
    assert disk.flush(10) and check_consistent(disk) == 3
    match = cache.lookup([*tokens, 1])
    assert match.tokens_by_tier == {"disk": 12} and disk.stats().counters["num_loads"] == 3 + 3  # from the files
    cache.release(match)
    disk.close()


def test_a_closed_tier_refuses_stores_and_finds_nothing(tmp_path):
    tier = open_tier(tmp_path / "kv")
    first, second = chain(range(8))
    assert store(tier, first)
    tier.close()
    assert not tier.prepare_store(second).accepted and tier.get(first.key) is None and tier.children(ROOT_A) == []
    assert tier.flush(1)


def test_the_start_up_sample_comes_from_the_asking_namespace_only(tmp_path):
    tier = open_tier(tmp_path / "kv")
    try:
        mine, other = chain(range(8)), chain(range(100, 108), root=ROOT_B)
        for entry in [*mine, *other]:  # the other namespace's blocks are the most recent
            assert store(tier, entry)
        tier.flush()  # only written files are sampled
        assert tier.sample_key(ROOT_A) in {entry.key for entry in mine}
        assert tier.sample_key(ROOT_B) in {entry.key for entry in other}
        assert tier.sample_key(bytes(32)) is None
    finally:
        tier.close()
