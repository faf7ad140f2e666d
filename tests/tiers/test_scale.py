"""Start-up at scale: the index and a directory listing suffice; entry files are not read (junk files would fail)."""

from __future__ import annotations

import hashlib

import pytest

from kvcellar.tiers.disk.state import INDEX_SLACK_BYTES
from kvcellar.tiers.disk.files import CacheDir
from kvcellar.tiers.disk.index import DiskIndex, IndexRow

from .helpers import ROOT_A, open_tier

NUM_ENTRIES = 20_000
FILE_BYTES = 64


def _build(folder_path, num_entries: int) -> None:
    """Index rows and files written directly. The files hold junk: reading any of them at start-up would fail it."""
    folder = CacheDir(folder_path)
    folder.create()
    index = DiskIndex(folder.index_path)
    rows, parent = [], ROOT_A
    for i in range(num_entries):
        key = hashlib.sha256(i.to_bytes(8, "little")).digest()
        path = folder.entry_path(ROOT_A, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * FILE_BYTES)
        parent = ROOT_A if i % 50 == 0 else parent  # chains of 50
        rows.append((IndexRow(key, parent, ROOT_A, FILE_BYTES, 32, 1, i, 256, False, False), range(256)))
        parent = key
    index.put(rows)
    index.commit()
    index.close()


@pytest.mark.slow
def test_restart_over_many_entries_is_fast_and_reads_no_entry_file(tmp_path):
    _build(tmp_path / "kv", NUM_ENTRIES)
    tier = open_tier(tmp_path / "kv", budget_bytes=1 << 40)
    counters = tier.stats().counters
    assert tier.num_entries == NUM_ENTRIES and counters["num_orphans_indexed"] == counters["num_missing_dropped"] == 0
    assert counters["num_corrupt"] == 0  # no file was opened
    tier.close()
    index_bytes = sum(path.stat().st_size for path in (tmp_path / "kv").glob("index.sqlite3*"))  # as closed

    # Over budget: pruned before serving. The budget covers the index too; here its files get about half.
    budget = index_bytes + INDEX_SLACK_BYTES + FILE_BYTES * NUM_ENTRIES // 2
    tier = open_tier(tmp_path / "kv", budget_bytes=budget)
    pruned = tier.stats().counters["num_pruned_at_open"]
    assert tier.num_bytes + tier.stats().counters["index_bytes"] <= budget and pruned == NUM_ENTRIES - tier.num_entries
    assert abs(pruned - NUM_ENTRIES // 2) <= NUM_ENTRIES // 10  # the index's size on disk moves with its WAL
    entries = {e.key: e for e in tier.entries()}
    assert all(e.parent == ROOT_A or e.parent in entries for e in entries.values())  # chains cut from their ends
    oldest_kept = min(e.last_used for e in entries.values())
    assert oldest_kept >= pruned - 50  # least recently used went first (within one chain's length)
    tier.close()
