"""Budgets hold at every moment (churn, start-up over budget); a full disk only costs counted drops."""

from __future__ import annotations

import errno
import random
import threading
import time

from kvcellar.cache import LayoutCapabilities, PrefixCache, Priority
from kvcellar.cache.reuse import NEAR
from kvcellar.tiers.memory import MemoryTier
from kvcellar.tiers.disk import entry_io, files
from kvcellar.tiers.disk.state import INDEX_SLACK_BYTES
from kvcellar.tiers.disk.writer import DiskWriter

from .helpers import B, ROOT_A, chain, check_consistent, entry_files, open_tier, payload_for


def _disk_bytes(folder, with_index: bool = False) -> int:
    """Bytes of every entry and temp file on disk right now (and of the index, WAL and shm: `with_index`).

    By inode: a file renamed while we list the folder may show up under both
    names, and must count once. Files may vanish while we look.
    """
    sizes: dict[int, int] = {}
    for path in (folder / "entries-v1").rglob("*"):
        try:
            info = path.stat()
        except FileNotFoundError:
            continue
        if path.is_file():
            sizes[info.st_ino] = info.st_size
    index = [folder / f"index.sqlite3{suffix}" for suffix in ("", "-wal", "-shm")] if with_index else []
    return sum(sizes.values()) + sum(p.stat().st_size for p in index if p.exists())


def _serialise_file_changes(monkeypatch) -> threading.RLock:
    """A lock held around every change the writer makes to entry files (whole atomic writes, deletions).

    A directory walk is not a snapshot: unsynchronised, it can stat a file
    just before the writer unlinks it and, later in the walk, a file written
    right after, and sum two files that never coexisted (the old flake of
    the test below). Holding this lock while walking makes each sample the
    directory as it was at one instant.
    """
    lock = threading.RLock()  # re-entered: the writer performs deletions between the pieces of a file
    write_atomic, delete_files = entry_io.write_atomic, DiskWriter.delete_files

    def locked_write(*args, **kwargs):
        with lock:
            return write_atomic(*args, **kwargs)

    def locked_delete(self, items):
        with lock:
            return delete_files(self, items)

    monkeypatch.setattr(entry_io, "write_atomic", locked_write)
    monkeypatch.setattr(DiskWriter, "delete_files", locked_delete)
    return lock


def _churn(cache: PrefixCache, rng: random.Random, num_steps: int) -> None:
    prefixes = [[rng.randrange(6) for _ in range(B * 3)] for _ in range(4)]
    for step in range(num_steps):
        if step % 20 == 0:
            cache.tiers[-1].flush(30)  # let the writer keep up now and then (fsyncs are slow here)
        tokens = rng.choice(prefixes)[: rng.randrange(1, 3) * B] + [rng.randrange(30) for _ in range(rng.randrange(1, 4) * B + 2)]
        match = cache.lookup(tokens)
        for block in match.blocks:
            assert block.payload == payload_for(block.key)  # never a wrong payload, from any tier
        cache.release(match)
        parent = match.blocks[-1].key if match.blocks else ROOT_A
        for entry in chain(tokens, priority=rng.choice(list(Priority)))[len(match.blocks) :]:
            parent = cache.insert_block(parent, entry.token_ids, entry.payload, entry.num_bytes, entry.priority)
            if parent is None:
                break


def test_budgets_hold_under_churn_and_at_start_up(tmp_path, monkeypatch):
    folder, budget = tmp_path / "kv", 250_000  # files + index + WAL: the index takes ~200 KB of it (tiers/disk/state.py)
    file_changes = _serialise_file_changes(monkeypatch)
    disk = open_tier(folder, budget_bytes=budget, max_queue_entries=16)
    cache = PrefixCache(ROOT_A, LayoutCapabilities(B, False, None), [MemoryTier(8_000), disk], reuse=NEAR,
                        write_through=("disk",))
    worst, stop = [0], threading.Event()

    def sample() -> None:  # the files on disk, watched while the writer works
        while not stop.is_set():
            with file_changes:
                worst[0] = max(worst[0], _disk_bytes(folder, with_index=True))
            time.sleep(0)  # let the writer take the lock between walks

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        _churn(cache, random.Random(7), 300)
    finally:
        stop.set()
        sampler.join()
    assert disk.flush(30)
    stats = cache.stats()
    counters = stats.tiers["disk"].counters
    assert counters["num_evictions"] > 0 and stats.num_evictions > 0  # it did churn
    # Queued entries are evictable: room is found but for a chain longer than the budget (was 377 drops
    # against 89 evictions when only stored entries could go).
    assert counters["num_writes_cancelled"] > 0 and counters["num_dropped_no_room"] * 100 <= counters["num_evictions"]
    largest_entry = 2296 + 2296 // 2 + 1024  # payload_for's largest payload plus a header
    assert worst[0] <= budget + largest_entry  # beyond the one file being written: never
    assert disk.num_bytes <= budget and _disk_bytes(folder) == disk.num_bytes
    assert stats.tiers["device"].num_bytes <= 8_000
    num_entries = check_consistent(disk)
    disk.close()

    closed_index = _disk_bytes(folder, with_index=True) - _disk_bytes(folder)  # the database alone, WAL folded in
    shm = 32 << 10  # SQLite's shared-memory file, back once the index is open
    smaller_budget = INDEX_SLACK_BYTES + closed_index + shm + disk.num_bytes // 2  # room for half the files
    smaller = open_tier(folder, budget_bytes=smaller_budget)  # start-up on an over-budget directory
    counters = smaller.stats().counters
    assert counters["num_pruned_at_open"] > 0 and smaller.num_entries == num_entries - counters["num_pruned_at_open"]
    assert _disk_bytes(folder) == smaller.num_bytes and _disk_bytes(folder, with_index=True) <= smaller_budget
    keys = {entry.key for entry in smaller.entries()}
    assert all(entry.parent == ROOT_A or entry.parent in keys for entry in smaller.entries())  # chains stay connected
    check_consistent(smaller)
    smaller.close()


def test_a_full_disk_drops_writes_and_serving_continues(tmp_path, monkeypatch):
    disk = open_tier(tmp_path / "kv")
    device = MemoryTier(1 << 20)
    cache = PrefixCache(ROOT_A, LayoutCapabilities(B, False, None), [device, disk], write_through=("disk",))
    real_write = files.write_chunks

    def no_space(fd, chunks):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "write_chunks", no_space)
    tokens = list(range(16))
    parent = ROOT_A
    for entry in chain(tokens):
        parent = cache.insert_block(parent, entry.token_ids, entry.payload, entry.num_bytes, entry.priority)
        assert parent is not None  # the insert never waits for, nor fails on, the disk
    assert disk.flush(10)
    counters = disk.stats().counters
    # The first write fails; the effective budget falls to what is on disk (the index alone), so the three
    # queued blocks are evicted to fit (their writes cancelled or skipped): one counted drop, never a partial file.
    assert counters["num_disk_full"] == 1 and counters["num_dropped_write_error"] == 1 and counters["num_dropped"] == 1
    assert counters["num_evictions"] == 3 and counters["num_written"] == 0
    assert disk.num_entries == 0 and disk.num_bytes == 0 and entry_files(tmp_path / "kv") == []
    assert not list((tmp_path / "kv").rglob("*.tmp"))
    match = cache.lookup([*tokens, 1])
    assert match.num_tokens == 16 and match.tokens_by_tier == {"device": 16}  # served from memory
    cache.release(match)

    monkeypatch.setattr(files, "write_chunks", real_write)  # space again: writes resume
    assert disk.flush(10)  # the idle writer sees free space (statvfs): the budget is back
    assert disk.stats().counters["effective_budget_bytes"] == disk.budget_bytes
    cache.set_budget_bytes(0)  # the device empties: its evictions are demoted to the disk
    assert disk.flush(10) and disk.num_entries == 4 and check_consistent(disk) == 4
    match = cache.lookup([*tokens, 1])
    assert match.tokens_by_tier == {"disk": 16}
    cache.release(match)
    disk.close()
