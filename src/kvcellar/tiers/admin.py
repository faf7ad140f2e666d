"""Disk cache administration with no model loaded: `kvcellar cache stats|ls|clear --cache-dir DIR`.

Operations: `disk_cache_stats(cache_dir) -> dict`, `list_disk_entries(cache_dir,
limit) -> list[dict]`, `clear_disk_cache(cache_dir, namespace=None) -> int`.

Reads go through the index (SQLite allows them while a server runs; that
server's last second of recency may be missing). `clear` takes the
directory lock, so it refuses while a process has the cache open: clear a
running server's cache through the server instead. All raise
`CacheDirError` for a folder that is not a kvcellar cache directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from kvcellar.cache import Priority
from kvcellar.tiers.files import CacheDir, CacheDirError, DirLock
from kvcellar.tiers.index import DiskIndex, IndexRow


def _open(cache_dir: str | Path) -> tuple[CacheDir, DiskIndex]:
    folder = CacheDir(cache_dir)
    if not folder.is_cache():
        raise CacheDirError(f"{folder.root} is not a kvcellar cache directory (no {folder.marker.name} file)")
    return folder, DiskIndex(folder.index_path)


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
    folder, index = _open(cache_dir)
    try:
        rows = index.rows()
        index_bytes = index.size_bytes()
    finally:
        index.close()
    namespaces: dict[str, dict[str, int]] = {}
    by_priority = {p.name: {"entries": 0, "bytes": 0} for p in Priority}
    for row in rows:
        slot = namespaces.setdefault(row.namespace.hex()[:16], {"entries": 0, "bytes": 0, "tokens": 0})
        slot["entries"] += 1
        slot["bytes"] += row.num_bytes
        slot["tokens"] += row.num_tokens
        by_priority[Priority(row.priority).name]["entries"] += 1
        by_priority[Priority(row.priority).name]["bytes"] += row.num_bytes
    quarantined = [p for p in folder.quarantine_dir.iterdir()] if folder.quarantine_dir.is_dir() else []
    return {
        "cache_dir": str(folder.root),
        "in_use": _in_use(folder),
        "num_entries": len(rows),
        "num_partial_entries": sum(row.is_partial for row in rows),
        "num_bytes": sum(row.num_bytes for row in rows),
        "num_tokens": sum(row.num_tokens for row in rows),
        "index_bytes": index_bytes,
        "num_quarantined": len(quarantined),
        "quarantine_bytes": sum(p.stat().st_size for p in quarantined),
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
        "is_partial": row.is_partial,
        "has_logits": row.has_logits,
        "last_used": row.last_used,
        "path": str(folder.entry_path(row.namespace, row.key)),
    }


def list_disk_entries(cache_dir: str | Path, limit: int = 50) -> list[dict]:
    """The `limit` most recently used entries, most recent first."""
    if limit < 0:
        raise ValueError(f"limit must be >= 0 (got {limit})")
    folder, index = _open(cache_dir)
    try:
        rows = index.rows()
    finally:
        index.close()
    rows.sort(key=lambda row: row.last_used, reverse=True)
    return [_describe(folder, row) for row in rows[:limit]]


def clear_disk_cache(cache_dir: str | Path, namespace: str | None = None) -> int:
    """Delete every entry (or those whose namespace hex starts with `namespace`); returns how many."""
    prefix = (namespace or "").lower()
    if prefix and (len(prefix) < 4 or any(c not in "0123456789abcdef" for c in prefix)):
        raise ValueError(f"namespace must be at least 4 hex digits of a namespace digest (got {namespace!r})")
    folder, index = _open(cache_dir)
    lock = DirLock(folder.lock_path)
    try:
        lock.acquire()  # CacheDirError while a server or an Engine has the directory open
        rows = [row for row in index.rows() if row.namespace.hex().startswith(prefix)]
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
                path.unlink(missing_ok=True)
        return len(rows)
    finally:
        lock.release()
        index.close()
