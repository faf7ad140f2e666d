"""Disk cache administration with no model loaded: `kvcellar cache stats|ls|clear --cache-dir DIR`.

Operations: `disk_cache_stats(cache_dir) -> dict`, `list_disk_entries(cache_dir,
limit) -> list[dict]`, `clear_disk_cache(cache_dir, namespace=None) -> int`.

Reads go through the index (SQLite allows them while a server runs; that
server's last second of recency may be missing); rows that fail the audit
(index.row_problem) are left out and counted (`num_bad_rows`). A damaged
index is repaired as a tier's start-up would (set aside, rebuilt from the
entry files' headers: recovery.py), which needs the directory lock: with
the cache in use, `stats` and `ls` then raise, naming the damage. `clear`
takes the lock, repairs, then deletes, so it refuses while a process has
the cache open: clear a running server's cache through the server instead.
All raise `CacheDirError` for a folder that is not a kvcellar cache
directory.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from kvcellar.cache import Priority
from kvcellar.tiers.disk.catalog import Catalog
from kvcellar.tiers.disk.files import CacheDir, CacheDirError, DirLock, remove_quarantined
from kvcellar.tiers.disk.index import IndexRow
from kvcellar.tiers.disk.index_repair import OpenedIndex, is_damage, open_index
from kvcellar.tiers.disk.recovery import recover


def _folder(cache_dir: str | Path) -> CacheDir:
    folder = CacheDir(cache_dir)
    if not folder.is_cache():
        raise CacheDirError(f"{folder.root} is not a kvcellar cache directory (no {folder.marker.name} file)")
    return folder


def _repaired(folder: CacheDir) -> OpenedIndex:
    """Under the directory lock: the index reconciled with the files (rebuilt if damaged), no pruning."""
    index, report = recover(folder, Catalog(), None)
    return OpenedIndex(index, index.rows(), [], rebuilt=bool(report["num_index_rebuilt"]))


def _open(cache_dir: str | Path) -> tuple[CacheDir, OpenedIndex]:
    """The index for reading; a damaged one is repaired first, if no process has the cache open."""
    folder = _folder(cache_dir)
    try:
        return folder, open_index(folder, repair=False)
    except sqlite3.Error as exc:
        if not is_damage(exc):
            raise CacheDirError(f"cannot read the index of {folder.root} now ({exc}); retry") from None
        damage = exc
    lock = DirLock(folder.lock_path)
    try:
        lock.acquire()
    except CacheDirError:
        raise CacheDirError(
            f"the index of {folder.root} is damaged ({damage}) and the cache is in use; its next start rebuilds "
            "the index from the entry files, or stop that process and run this again"
        ) from None
    try:
        return folder, _repaired(folder)
    finally:
        lock.release()


def _in_use(folder: CacheDir) -> bool:
    lock = DirLock(folder.lock_path)
    try:
        lock.acquire()
    except CacheDirError:
        return True
    lock.release()
    return False


def disk_cache_stats(cache_dir: str | Path) -> dict:
    """Totals, per namespace (first 16 hex digits) and per priority, plus quarantine and index sizes."""
    folder, opened = _open(cache_dir)
    try:
        rows = opened.rows
        index_bytes = opened.index.size_bytes()
    finally:
        opened.index.close()
    namespaces: dict[str, dict[str, int]] = {}
    by_priority = {p.name: {"entries": 0, "bytes": 0} for p in Priority}
    for row in rows:
        slot = namespaces.setdefault(row.namespace.hex()[:16], {"entries": 0, "bytes": 0, "tokens": 0})
        slot["entries"] += 1
        slot["bytes"] += row.num_bytes
        slot["tokens"] += row.num_tokens
        by_priority[Priority(row.priority).name]["entries"] += 1
        by_priority[Priority(row.priority).name]["bytes"] += row.num_bytes
    quarantined = list(folder.quarantine_dir.iterdir()) if folder.quarantine_dir.is_dir() else []
    return {
        "cache_dir": str(folder.root),
        "in_use": _in_use(folder),
        "num_entries": len(rows),
        "num_partial_entries": sum(row.is_tail for row in rows),
        "num_bytes": sum(row.num_bytes for row in rows),
        "num_tokens": sum(row.num_tokens for row in rows),
        "index_bytes": index_bytes,
        "index_rebuilt": opened.rebuilt,
        "num_bad_rows": len(opened.bad_keys),
        "num_quarantined": len(quarantined),
        "quarantine_bytes": sum(p.lstat().st_size for p in quarantined),
        "namespaces": namespaces,
        "by_priority": by_priority,
    }


def _describe(folder: CacheDir, row: IndexRow) -> dict:
    return {
        "key": row.key.hex(),
        "parent": row.parent.hex(),
        "namespace": row.namespace.hex(),
        "num_tokens": row.num_tokens,
        "num_bytes": row.num_bytes,
        "payload_bytes": row.payload_bytes,
        "priority": Priority(row.priority).name,
        "is_partial": row.is_tail,
        "has_logits": row.has_logits,
        "last_used": row.last_used,
        "path": str(folder.entry_path(row.namespace, row.key)),
    }


def list_disk_entries(cache_dir: str | Path, limit: int = 50) -> list[dict]:
    """The `limit` most recently used entries, most recent first."""
    if limit < 0:
        raise ValueError(f"limit must be >= 0 (got {limit})")
    folder, opened = _open(cache_dir)
    opened.index.close()
    rows = opened.rows
    rows.sort(key=lambda row: row.last_used, reverse=True)
    return [_describe(folder, row) for row in rows[:limit]]


def clear_disk_cache(cache_dir: str | Path, namespace: str | None = None) -> int:
    """Delete every entry (or those whose namespace hex starts with `namespace`); returns how many."""
    prefix = (namespace or "").lower()
    if prefix and (len(prefix) < 4 or any(c not in "0123456789abcdef" for c in prefix)):
        raise ValueError(f"namespace must be at least 4 hex digits of a namespace digest (got {namespace!r})")
    folder = _folder(cache_dir)
    lock = DirLock(folder.lock_path)
    lock.acquire()  # CacheDirError while a server or an Engine has the directory open
    index = None
    try:
        opened = _repaired(folder)  # every file indexed, whatever state the index was in
        index = opened.index
        rows = [row for row in opened.rows if row.namespace.hex().startswith(prefix)]
        for row in rows:  # files first, rows after: an interrupted clear leaves rows that start-up drops
            folder.entry_path(row.namespace, row.key).unlink(missing_ok=True)
        index.delete([row.key for row in rows])
        index.commit()
        if folder.entries.is_dir():  # orphans and temp files of the cleared namespaces too
            for ns_dir in folder.entries.iterdir():
                if ns_dir.name.startswith(prefix[:16]):
                    shutil.rmtree(ns_dir, ignore_errors=True)
        if not prefix and folder.quarantine_dir.is_dir():
            for path in folder.quarantine_dir.iterdir():
                remove_quarantined(path)
        return len(rows)
    finally:
        if index is not None:
            index.close()
        lock.release()
