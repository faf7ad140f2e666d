"""Damaged files are misses: counted, quarantined, never served; start-up repairs what a crash left."""

from __future__ import annotations

import os
import shutil

import pytest

from kvcellar.cache import LayoutCapabilities, PrefixCache
from kvcellar.tiers.memory import MemoryTier
from kvcellar.tiers.disk.index import DiskIndex

from .helpers import B, ROOT_A, ROOT_B, chain, check_consistent, entry_files, file_of, make_block, open_tier, payload_for, store


@pytest.fixture
def stored(tmp_path):
    """A flushed tier holding one 3-block chain, reopened so every read comes from the file."""
    tier = open_tier(tmp_path / "kv")
    entries = chain(range(12))
    for entry in entries:
        assert store(tier, entry)
    tier.close()
    tier = open_tier(tmp_path / "kv")
    yield tier, entries
    tier.close()


def _flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x10
    path.write_bytes(bytes(data))


def _assert_not_served(tier, entry, kind: str) -> None:
    with pytest.raises(KeyError, match="cannot be served"):
        tier.prepare_load([entry.key])
    assert not tier.contains(entry.key)
    assert tier.stats().counters[f"num_{kind}"] == 1
    with pytest.raises(KeyError):  # gone for good: never served later either
        tier.prepare_load([entry.key])


@pytest.mark.parametrize("where", ["length", "header", "checksum", "data", "last byte"])
def test_a_flipped_bit_is_a_miss_and_quarantined(stored, where):
    tier, entries = stored
    path = file_of(tier, entries[2])
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    checksum_at = path.read_bytes().index(b'"checksum":"') + 30
    offset = {"length": 1, "header": 40, "checksum": checksum_at, "data": 8 + header_len + 5, "last byte": -1}[where]
    _flip(path, offset)
    _assert_not_served(tier, entries[2], "corrupt")
    assert tier.stats().counters["num_quarantined"] == 1
    assert [p.name.split(".")[0] for p in (tier.cache_dir / "quarantine").iterdir()] == [entries[2].key.hex()]
    assert tier.prepare_load([entries[0].key, entries[1].key])[1].payload == payload_for(entries[1].key)


def test_every_single_byte_flip_is_caught(stored):
    tier, entries = stored
    path = file_of(tier, entries[0])
    original = path.read_bytes()
    from kvcellar.tiers.codec import RawCodec
    from kvcellar.tiers.disk.entry_io import Expected, ReadFailure, read_entry

    e = entries[0]
    expected = Expected(e.key, e.parent, e.namespace, len(original), False, False, B)
    assert read_entry(path, expected, RawCodec())[1] == payload_for(e.key)
    for offset in range(len(original)):
        damaged = bytearray(original)
        damaged[offset] ^= 0x01
        path.write_bytes(bytes(damaged))
        with pytest.raises(ReadFailure):
            read_entry(path, expected, RawCodec())
    path.write_bytes(original)


def test_a_truncated_file_is_a_miss(stored):
    tier, entries = stored
    path = file_of(tier, entries[1])
    os.truncate(path, path.stat().st_size - 7)
    _assert_not_served(tier, entries[1], "corrupt")


def test_another_entrys_file_under_this_name_is_a_miss(stored):
    tier, entries = stored
    shutil.copyfile(file_of(tier, entries[0]), file_of(tier, entries[1]))  # right format, wrong key
    _assert_not_served(tier, entries[1], "corrupt")


def test_a_file_from_another_namespace_is_never_served(tmp_path):
    tier = open_tier(tmp_path / "kv")
    mine, theirs = make_block(ROOT_A, [1, 2, 3, 4]), make_block(ROOT_B, [1, 2, 3, 4], root=ROOT_B)
    assert store(tier, mine) and store(tier, theirs) and tier.flush(10)
    assert mine.key != theirs.key  # the namespace is hashed into every key
    # Forge: namespace B's file, renamed to namespace A's key.
    shutil.copyfile(file_of(tier, theirs), file_of(tier, mine))
    _assert_not_served(tier, mine, "corrupt")
    assert tier.prepare_load([theirs.key])[0].payload == payload_for(theirs.key)
    tier.close()


def test_a_missing_file_is_a_miss_without_quarantine(stored):
    tier, entries = stored
    file_of(tier, entries[2]).unlink()
    _assert_not_served(tier, entries[2], "missing")
    assert tier.stats().counters["num_quarantined"] == 0


def test_a_lookup_stops_before_a_corrupt_block_and_stays_correct(stored):
    tier, entries = stored
    _flip(file_of(tier, entries[1]), -3)
    cache = PrefixCache(ROOT_A, LayoutCapabilities(B, False, None), [MemoryTier(1 << 20), tier])
    match = cache.lookup(list(range(13)))
    assert match.num_tokens == 4 and [b.payload for b in match.blocks] == [payload_for(entries[0].key)]
    cache.release(match)
    stats = cache.stats()
    assert stats.num_load_failures == 1 and stats.tiers["disk"].counters["num_corrupt"] == 1


def test_start_up_reconciles_index_and_files(tmp_path):
    tier = open_tier(tmp_path / "kv")
    entries = chain(range(16))
    for entry in entries:
        store(tier, entry)
    tier.close()
    folder = tmp_path / "kv"
    file_of(tier, entries[3]).unlink()  # a row without its file
    orphan = make_block(ROOT_A, [9, 9, 9, 9])  # a file without its row: written, then the process died
    probe = open_tier(tmp_path / "probe")
    store(probe, orphan)
    probe.close()
    target = file_of(tier, orphan)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(file_of(probe, orphan), target)
    junk = target.with_name(target.name[:2] + "f" * 62 + ".safetensors")
    junk.write_bytes(b"\x08" + b"\x00" * 7 + b"garbage!")  # an orphan whose header is not valid
    temp = target.with_name(target.name + ".123.0.tmp")
    temp.write_bytes(b"half a write")
    stray = target.with_name("README")
    stray.write_text("not ours")

    tier = open_tier(folder)
    counters = tier.stats().counters
    assert (counters["num_missing_dropped"], counters["num_orphans_indexed"], counters["num_orphans_removed"]) == (1, 1, 1)
    assert (counters["num_temp_removed"], counters["num_strays_removed"]) == (1, 1)
    assert not temp.exists() and not junk.exists() and not stray.exists()
    assert check_consistent(tier) == 4 and tier.contains(orphan.key)
    tier.close()
    index = DiskIndex(folder / "index.sqlite3")
    assert len(index.rows()) == 4 == len(entry_files(folder))
    index.close()
