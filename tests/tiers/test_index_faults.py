"""A damaged index never stops the tier: it is set aside and rebuilt from the files; bad rows are dropped and counted."""

from __future__ import annotations

import os
import sqlite3
import struct
from dataclasses import replace
from pathlib import Path

import pytest

from kvcellar.cache import LayoutCapabilities, PrefixCache
from kvcellar.tiers.memory import MemoryTier
from kvcellar.tiers.disk.admin import clear_disk_cache, disk_cache_stats, list_disk_entries
from kvcellar.tiers.disk.files import CacheDirError, DirLock
from kvcellar.tiers.format import FormatError, encode_header, parse_header
from kvcellar.tiers.disk.index import DiskIndex

from .helpers import B, ROOT_A, chain, check_consistent, entry_files, make_partial, open_tier, payload_for, store

NUM_ENTRIES = 4  # three chained blocks and a partial


@pytest.fixture
def folder(tmp_path) -> Path:
    tier = open_tier(tmp_path / "kv")
    for entry in _entries():
        assert store(tier, entry)
    tier.close()
    assert not Path(f"{tmp_path / 'kv' / 'index.sqlite3'}-wal").exists()  # closed: the WAL was checkpointed
    return tmp_path / "kv"


def _entries():
    return [*chain(range(12)), make_partial(ROOT_A, [1, 2])]


def _file(folder: Path, entry) -> Path:
    return folder / "entries-v1" / entry.namespace.hex()[:16] / entry.key.hex()[:2] / f"{entry.key.hex()}.safetensors"


def _sql(folder: Path, statement: str, *params) -> None:
    db = sqlite3.connect(folder / "index.sqlite3")
    db.execute(statement, params)
    db.commit()
    db.close()


def _garbage_over_pages(index: Path) -> None:
    data = bytearray(index.read_bytes())
    data[4096:] = b"\xaa" * (len(data) - 4096)  # every page after the first (the schema survives)
    index.write_bytes(bytes(data))


def _drop_tables(index: Path, tables: str) -> None:
    db = sqlite3.connect(index)
    db.executescript("".join(f"DROP TABLE {table};" for table in tables.split()))
    db.close()


def _wrong_schema(index: Path) -> None:
    db = sqlite3.connect(index)
    db.executescript("DROP TABLE entries; CREATE TABLE entries (key BLOB PRIMARY KEY, other TEXT);")
    db.close()


def _as_folder(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.mkdir()
    (path / "x").write_text("a folder where a file belongs")


DAMAGE = {  # name: (damage, the index is rebuilt, rows dropped as bad at open)
    "malformed": (_garbage_over_pages, True, 0),
    "not a database": (lambda p: p.write_bytes(os.urandom(p.stat().st_size)), True, 0),
    "wrong columns": (_wrong_schema, True, 0),
    "path is a folder": (_as_folder, True, 0),
    "wal is a folder": (lambda p: _as_folder(Path(f"{p}-wal")), True, 0),
    "no tables": (lambda p: _drop_tables(p, "entries tokens"), False, 0),
    "no tokens table": (lambda p: _drop_tables(p, "tokens"), False, NUM_ENTRIES),
    "wal garbage": (lambda p: Path(f"{p}-wal").write_bytes(os.urandom(40_000)), False, 0),
    "shm garbage": (lambda p: Path(f"{p}-shm").write_bytes(os.urandom(32_768)), False, 0),
}


@pytest.mark.parametrize("name", DAMAGE)
def test_a_damaged_index_is_rebuilt_from_the_files(folder, name):
    damage, rebuilt, num_bad = DAMAGE[name]
    damage(folder / "index.sqlite3")
    tier = open_tier(folder)
    counters = tier.stats().counters
    assert (counters["num_index_rebuilt"], counters["num_bad_rows_at_open"]) == (int(rebuilt), num_bad)
    # Rebuilt, or with every row dropped, each file is indexed again from its header.
    assert counters["num_orphans_indexed"] == (NUM_ENTRIES if rebuilt or name.startswith("no ") else 0)
    assert counters["num_orphans_removed"] == counters["num_corrupt"] == 0
    assert check_consistent(tier) == NUM_ENTRIES  # every entry serves its own payload
    assert {e.key: e.token_ids for e in tier.entries()} == {e.key: e.token_ids for e in _entries()}
    tier.close()
    aside = sorted(p.name.split(".damaged-")[0] for p in (folder / "quarantine").iterdir())
    moved = {"wal is a folder": ["index.sqlite3", "index.sqlite3-wal"]}.get(name, ["index.sqlite3"] if rebuilt else [])
    assert aside == moved
    tier = open_tier(folder)  # the rebuilt index is whole: nothing left to repair
    assert not any(v for k, v in tier.stats().counters.items() if k.startswith("num_") and k != "num_loads")
    assert tier.num_entries == NUM_ENTRIES
    tier.close()


BAD_ROWS = {
    "token bytes not a multiple of 4": "UPDATE tokens SET token_ids = x'010203' WHERE key = ?",
    "token count differs": "UPDATE tokens SET token_ids = zeroblob(8) WHERE key = ?",
    "no token row": "DELETE FROM tokens WHERE key = ?",
    "token ids not a blob": "UPDATE tokens SET token_ids = 'text' WHERE key = ?",
    "priority out of range": "UPDATE entries SET priority = 7 WHERE key = ?",
    "negative num_tokens": "UPDATE entries SET num_tokens = -1 WHERE key = ?",
    "short namespace": "UPDATE entries SET namespace = x'0102' WHERE key = ?",
    "parent not a blob": "UPDATE entries SET parent = 'root' WHERE key = ?",
    "own parent": "UPDATE entries SET parent = key WHERE key = ?",
    "last_used text": "UPDATE entries SET last_used = 'soon' WHERE key = ?",
    "last_used past the clock": "UPDATE entries SET last_used = 9223372036854775807 WHERE key = ?",
    "flag out of range": "UPDATE entries SET is_partial = 5 WHERE key = ?",
    "num_bytes impossible": "UPDATE entries SET num_bytes = 1000000000000 WHERE key = ?",
    "num_bytes below the payload": "UPDATE entries SET num_bytes = 3 WHERE key = ?",
}


@pytest.mark.parametrize("name", BAD_ROWS)
def test_a_bad_row_is_dropped_at_open_and_its_file_indexed_again(folder, name):
    middle = _entries()[1]  # a parent (of the third block) and a child
    _sql(folder, BAD_ROWS[name], middle.key)
    stats = disk_cache_stats(folder)  # the admin tools skip the row, and say so
    assert (stats["num_entries"], stats["num_bad_rows"], stats["index_rebuilt"]) == (NUM_ENTRIES - 1, 1, False)
    assert len(list_disk_entries(folder)) == NUM_ENTRIES - 1
    tier = open_tier(folder)
    counters = tier.stats().counters
    assert (counters["num_bad_rows_at_open"], counters["num_orphans_indexed"], counters["num_index_rebuilt"]) == (1, 1, 0)
    assert check_consistent(tier) == NUM_ENTRIES
    cache = PrefixCache(ROOT_A, LayoutCapabilities(B, False, None), [MemoryTier(1 << 20), tier])
    match = cache.lookup(list(range(13)))
    assert match.num_tokens == 12 and [b.payload for b in match.blocks] == [payload_for(e.key) for e in _entries()[:3]]
    cache.release(match)
    tier.close()
    assert disk_cache_stats(folder)["num_bad_rows"] == 0


def _damage_tokens_now(tier, key: bytes) -> None:
    """Break a row while the tier is open (another connection), as a disk error would."""
    assert tier.flush(30)
    _sql(tier.cache_dir, "UPDATE tokens SET token_ids = x'0102030405' WHERE key = ?", key)


def test_a_row_that_breaks_while_serving_is_dropped_never_raised(folder):
    tier = open_tier(folder)
    entries = _entries()
    _damage_tokens_now(tier, entries[2].key)
    cache = PrefixCache(ROOT_A, LayoutCapabilities(B, False, None), [MemoryTier(1 << 20), tier])
    match = cache.lookup(list(range(13)))  # stops before the broken block
    assert match.num_tokens == 8 and match.tokens_by_tier == {"disk": 8}
    cache.release(match)
    counters = tier.stats().counters
    assert counters["num_bad_rows"] == 1 and counters["num_corrupt"] == 0 and not tier.contains(entries[2].key)
    assert tier.flush(30) and not _file(folder, entries[2]).exists()  # its file and row went with it
    assert store(tier, entries[2]) and tier.flush(30)  # the key can be stored again
    assert tier.stats().counters["num_written"] == 1 and check_consistent(tier) == NUM_ENTRIES
    tier.close()


def test_a_row_without_token_ids_does_not_block_a_store_of_its_key(folder):
    tier = open_tier(folder)
    leaf = _entries()[2]
    _damage_tokens_now(tier, leaf.key)
    assert store(tier, leaf) and tier.flush(30)  # straight to the store, no lookup first: written, not "already stored"
    counters = tier.stats().counters
    assert (counters["num_bad_rows"], counters["num_written"]) == (1, 1)
    assert tier.get(leaf.key).token_ids == leaf.token_ids and check_consistent(tier) == NUM_ENTRIES
    tier.close()


@pytest.mark.parametrize("change", ["SET num_bytes = num_bytes + 8", "SET num_bytes = num_bytes - 8", "SET has_logits = 1"])
def test_a_valid_file_whose_row_disagrees_is_kept_and_reindexed(folder, change):
    leaf = _entries()[2]
    path = _file(folder, leaf)
    original = path.read_bytes()
    _sql(folder, f"UPDATE entries {change} WHERE key = ?", leaf.key)
    tier = open_tier(folder)
    assert tier.stats().counters["num_bad_rows_at_open"] == 0  # plausible values: only the file can tell
    with pytest.raises(KeyError, match="cannot be served"):  # the lookup used the row's values: a miss
        tier.prepare_load([leaf.key])
    counters = tier.stats().counters
    assert (counters["num_bad_rows"], counters["num_corrupt"], counters["num_quarantined"]) == (1, 0, 0)
    assert list((folder / "quarantine").iterdir()) == []
    assert tier.contains(leaf.key) and tier.flush(30)  # stored again from the verified file
    assert path.read_bytes() == original
    (row,) = [r for r in DiskIndex(folder / "index.sqlite3").rows() if r.key == leaf.key]
    assert (row.num_bytes, row.has_logits) == (len(original), False)
    assert tier.num_bytes == sum(p.stat().st_size for p in entry_files(folder))
    assert check_consistent(tier) == NUM_ENTRIES
    tier.close()


def _rewrite_header(path: Path, head: bytes) -> None:
    """Replace the file's header by `head` (8-byte length and JSON), keeping its tensor bytes."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    path.write_bytes(head + data[8 + length :])


def _nested(length: int) -> bytes:
    text = b"[" * length
    return struct.pack("<Q", len(text)) + text


def test_a_deeply_nested_header_is_a_format_error():
    with pytest.raises(FormatError, match="nested too deeply"):
        parse_header(_nested(400_000))


HEADERS = {
    "nested 400k deep": lambda header: _nested(400_000),
    "unknown priority": lambda header: encode_header(replace(header, priority=9)),
    "negative token id": lambda header: encode_header(replace(header, token_ids=(-1, *header.token_ids[1:]))),
    "short key": lambda header: encode_header(replace(header, parent=b"\x01" * 4)),
}


@pytest.mark.parametrize("name", HEADERS)
@pytest.mark.parametrize("indexed", [True, False], ids=["indexed", "orphan"])
def test_a_hostile_header_is_quarantined_and_counted(folder, name, indexed):
    leaf = _entries()[2]
    path = _file(folder, leaf)
    header, _ = parse_header(path.read_bytes())
    _rewrite_header(path, HEADERS[name](header))
    if not indexed:
        _sql(folder, "DELETE FROM entries WHERE key = ?", leaf.key)
    tier = open_tier(folder)
    if indexed:
        with pytest.raises(KeyError, match="cannot be served"):
            tier.prepare_load([leaf.key])
        counters = tier.stats().counters
        assert (counters["num_corrupt"], counters["num_quarantined"]) == (1, 1)
    else:
        assert tier.stats().counters["num_orphans_removed"] == 1 and not tier.contains(leaf.key)
    assert [p.name[:64] for p in (folder / "quarantine").iterdir()] == [leaf.key.hex()]
    assert tier.flush(30) and not path.exists() and tier.num_entries == NUM_ENTRIES - 1
    assert {r.key for r in DiskIndex(folder / "index.sqlite3").rows()} == {e.key for e in tier.entries()}
    loaded = tier.prepare_load([e.key for e in _entries()[:2]])
    assert [e.payload for e in loaded] == [payload_for(e.key) for e in _entries()[:2]]
    tier.close()


def test_the_admin_tools_repair_a_damaged_index(folder):
    (folder / "index.sqlite3").write_bytes(os.urandom(8192))
    lock = DirLock(folder / "lock")
    lock.acquire()  # as a running server would hold it
    with pytest.raises(CacheDirError, match="damaged .* in use"):
        disk_cache_stats(folder)
    lock.release()
    stats = disk_cache_stats(folder)
    assert (stats["num_entries"], stats["index_rebuilt"], stats["num_tokens"]) == (NUM_ENTRIES, True, 14)
    assert stats["num_quarantined"] == 1 and not stats["in_use"]
    assert disk_cache_stats(folder)["index_rebuilt"] is False
    assert len(list_disk_entries(folder)) == NUM_ENTRIES
    (folder / "index.sqlite3").unlink()
    (folder / "index.sqlite3").mkdir()
    assert clear_disk_cache(folder) == NUM_ENTRIES and entry_files(folder) == []
    assert disk_cache_stats(folder)["num_entries"] == 0


def test_an_index_that_fails_while_serving_is_a_miss_that_drops_nothing(folder, monkeypatch):
    tier = open_tier(folder)
    entries = _entries()

    def malformed(keys):  # isolates the tier from SQLite: its reader connection failing at run time
        raise sqlite3.DatabaseError("database disk image is malformed")

    monkeypatch.setattr(tier._state._reader, "tokens", malformed)
    assert tier.get(entries[0].key) is None and tier.children(ROOT_A) == []
    counters = tier.stats().counters
    assert (counters["num_index_errors"], counters["num_bad_rows"]) == (2, 0) and tier.num_entries == NUM_ENTRIES
    monkeypatch.undo()
    assert tier.get(entries[0].key).token_ids == entries[0].token_ids  # nothing was dropped
    assert check_consistent(tier) == NUM_ENTRIES
    tier.close()
