"""Queued writes are evictable, the index and WAL count in the budget, a budget cut holds on return, a full disk evicts.

Entries here are 40 KB, so "beyond one entry in flight" is a real bound next
to the index's pages. ENOSPC comes from a real small tmpfs where this process
may mount one (root), else from `files.write_chunks` replaced by a fake
filesystem capacity.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvcellar.cache import CacheEntry, Priority, hash_block
from kvcellar.tiers.disk import files, state as disk_state
from kvcellar.tiers.disk.state import INDEX_SLACK_BYTES
from kvcellar.tiers.disk.index import WAL_CHECKPOINT_BYTES

from .helpers import ROOT_A, entry_files, open_tier, store

PAYLOAD = 40_000


def big_entry(i: int, parent: bytes = ROOT_A) -> CacheEntry:
    key = hash_block(parent, [i, i + 1, i + 2, i + 3])
    body = {"0.keys": key * (PAYLOAD // 64), "0.values": key[::-1] * (PAYLOAD // 64)}
    return CacheEntry(key, parent, (i, i + 1, i + 2, i + 3), sum(map(len, body.values())), Priority.USER, body,
                      is_tail=False, namespace=ROOT_A)  # fmt: skip


def on_disk(folder: Path) -> int:
    """Entry files, temp files, index, WAL and shm: every byte the cache has on disk."""
    paths = list((folder / "entries-v1").rglob("*")) + [folder / f"index.sqlite3{s}" for s in ("", "-wal", "-shm")]
    return sum(p.stat().st_size for p in paths if p.is_file())


def entry_size(tier) -> int:
    (path, *_) = entry_files(tier.cache_dir)
    return path.stat().st_size


# -- queued entries are evictable; evicting one cancels its write -------------------------------------


def test_evicting_a_queued_entry_cancels_its_write(tmp_path):
    tier = open_tier(tmp_path / "kv", start_writer=False)
    first, second = big_entry(1), big_entry(2)
    assert store(tier, first) and store(tier, second)
    assert tier.evict(first.key) is not None
    counters = tier.stats().counters
    assert counters["num_writes_cancelled"] == 1 and counters["num_queued"] == 1  # the slot is free at once
    tier.start()
    assert tier.flush(60)
    counters = tier.stats().counters
    assert counters["num_written"] == 1 and [p.name[:64] for p in entry_files(tmp_path / "kv")] == [second.key.hex()]
    tier.close()


def test_a_store_evicts_queued_entries_when_nothing_is_stored_yet(tmp_path):
    probe = open_tier(tmp_path / "probe")
    assert store(probe, big_entry(0)) and probe.flush(60)
    size, index = entry_size(probe), probe.stats().counters["index_bytes"]
    probe.close()
    budget = index + INDEX_SLACK_BYTES + 2 * size + size // 2  # room for two entries' files
    tier = open_tier(tmp_path / "kv", budget_bytes=budget, start_writer=False)  # nothing is written meanwhile
    entries = [big_entry(i) for i in range(1, 6)]
    assert all(store(tier, e) for e in entries)  # each evicts the oldest queued one: never a drop
    counters = tier.stats().counters
    assert counters["num_dropped"] == 0 and counters["num_evictions"] == 3 and counters["num_writes_cancelled"] == 3
    tier.start()
    assert tier.flush(60)
    assert sorted(p.name[:64] for p in entry_files(tmp_path / "kv")) == sorted(e.key.hex() for e in entries[3:])
    assert on_disk(tmp_path / "kv") <= budget
    tier.close()


# -- index and WAL: checkpointed, counted --------------------------------------------------------------


def test_the_wal_is_checkpointed_and_the_index_counts_in_the_budget(tmp_path):
    folder, budget = tmp_path / "kv", 2_000_000
    tier = open_tier(folder, budget_bytes=budget)
    worst = 0
    for i in range(200):  # ~8 MB of entries through a 2 MB budget, one commit each
        assert store(tier, big_entry(i))
        assert tier.flush(60)
        worst = max(worst, on_disk(folder))
        tier.touch([big_entry(i // 2).key])  # recency updates commit too
    counters = tier.stats().counters
    assert counters["num_evictions"] > 100 and counters["num_dropped"] == 0
    wal = folder / "index.sqlite3-wal"
    assert not wal.exists() or wal.stat().st_size <= 2 * WAL_CHECKPOINT_BYTES
    assert worst <= budget + entry_size(tier)  # at most one entry in flight beyond the budget
    assert counters["index_bytes"] == sum(
        p.stat().st_size for p in folder.glob("index.sqlite3*") if p.is_file()
    )  # what the tier counts is what is there
    tier.close()


# -- a budget cut takes effect within the call -----------------------------------------------------------


def test_a_budget_cut_has_deleted_the_files_when_it_returns_even_during_a_prefill(tmp_path):
    folder = tmp_path / "kv"
    tier = open_tier(folder, budget_bytes=4_000_000)
    for i in range(40):
        assert store(tier, big_entry(i))
    assert tier.flush(60) and tier.num_entries == 40
    tier.defer_writes(True)  # a prefill runs: the writer holds writes back, never deletions
    for i in range(40, 45):
        assert store(tier, big_entry(i))  # queued, unwritten
    new_budget = 1_000_000
    evicted = tier.set_budget(new_budget)
    assert len(evicted) > 0 and tier.num_bytes + tier.stats().counters["index_bytes"] <= new_budget
    assert on_disk(folder) <= new_budget + entry_size(tier)  # already, in the call's return
    tier.defer_writes(False)
    assert tier.flush(60) and on_disk(folder) <= new_budget
    tier.close()


# -- a full disk lowers the effective budget and evicts to fit ------------------------------------------


def _fill(tier, first: int, count: int) -> None:
    for i in range(first, first + count):
        store(tier, big_entry(i))
        assert tier.flush(60)


def _check_full_disk_run(tier, folder: Path, capacity: int, caplog) -> None:
    _fill(tier, 0, 60)  # ~5 MB into a smaller disk
    counters = tier.stats().counters
    assert counters["num_disk_full"] >= 1
    written_at_full = counters["num_written"]
    assert counters["effective_budget_bytes"] <= capacity < tier.budget_bytes
    _fill(tier, 100, 20)  # after the disk filled: each new entry evicts to fit, and is written
    counters = tier.stats().counters
    assert counters["num_written"] == written_at_full + 20 and counters["num_evictions"] >= 20
    assert tier.contains(big_entry(119).key)
    assert on_disk(folder) <= counters["effective_budget_bytes"] + entry_size(tier)
    tier.touch([big_entry(119).key])
    assert tier.flush(60)  # recency sync on a full disk: no traceback
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_full_disk_lowers_the_effective_budget_and_evicts_to_fit(tmp_path, monkeypatch, caplog):
    folder, capacity = tmp_path / "kv", 1_500_000
    real_write = files.write_chunks

    def write_into_a_small_disk(fd, chunks):
        total = 0
        for chunk in chunks:
            if on_disk(folder) + len(chunk) > capacity:
                raise OSError(errno.ENOSPC, "No space left on device")
            total += real_write(fd, [chunk])
        return total

    monkeypatch.setattr(files, "write_chunks", write_into_a_small_disk)
    monkeypatch.setattr(disk_state, "free_bytes", lambda path: max(0, capacity - on_disk(folder)))
    tier = open_tier(folder, budget_bytes=100_000_000)
    _check_full_disk_run(tier, folder, capacity, caplog)
    tier.close()


def _mount_tmpfs(path: Path, size: int) -> bool:
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return False
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def test_a_real_full_filesystem(tmp_path, caplog):
    mount, capacity = tmp_path / "small", 2 << 20
    if not _mount_tmpfs(mount, capacity):
        pytest.skip("mounting a small tmpfs is not permitted here")
    try:
        tier = open_tier(mount / "kv", budget_bytes=100_000_000)
        _check_full_disk_run(tier, mount / "kv", capacity, caplog)
        tier.close()
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)
