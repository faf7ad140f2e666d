"""Opening the disk tier's index whatever state it is in: a damaged index is set aside and rebuilt.

Operations: `open_index(cache_dir, repair) -> OpenedIndex` (a usable index, the
rows that pass the audit, the keys of those that do not, whether it was
rebuilt), `is_damage(exc)`.

The files are the truth (index.py), so no state of the index may stop the
tier from opening. An index SQLite cannot use ("database disk image is
malformed", "file is not a database", a table with other columns, the path
or its -wal being a folder) is moved into quarantine/ (files.set_index_aside)
and a fresh one created; recovery then indexes every entry file from its
header, as it does orphans. A busy or locked database, a full disk or
missing permissions are not damage: moving the index aside would not help,
so those raise.
Rows are audited before any of their values is used (`index.row_problem`,
and token ids present with exactly `num_tokens` u32s): a failing row is
reported in `bad_keys`; recovery deletes it, and its file, if valid, is
indexed again from its header.
"""

from __future__ import annotations

import logging
import sqlite3
from contextlib import suppress
from dataclasses import dataclass

from kvcellar.tiers.disk.files import CacheDir, set_index_aside
from kvcellar.tiers.disk.index import DiskIndex, IndexRow

log = logging.getLogger(__name__)
# Errors that say nothing about the database's bytes: retrying later, or fixing the folder, is the answer.
_NOT_DAMAGE = frozenset(("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_FULL", "SQLITE_NOMEM", "SQLITE_INTERRUPT",
                         "SQLITE_READONLY", "SQLITE_PERM", "SQLITE_AUTH"))  # fmt: skip


@dataclass
class OpenedIndex:
    index: DiskIndex
    rows: list[IndexRow]  # rows that pass the audit
    bad_keys: list[object]  # keys (as stored) of rows that do not: delete by these
    rebuilt: bool  # the old index was set aside; `rows` is empty


def is_damage(exc: sqlite3.Error) -> bool:
    """Whether an error opening or reading the index means its files cannot be used as they are."""
    return getattr(exc, "sqlite_errorname", None) not in _NOT_DAMAGE


def _open_checked(cache_dir: CacheDir) -> OpenedIndex:
    index = DiskIndex(cache_dir.index_path)
    try:
        index.check_schema()
        rows, bad_keys = index.scan()
        no_tokens = index.keys_without_tokens()
    except BaseException:
        with suppress(sqlite3.Error):
            index.close()
        raise
    bad_keys += [row.key for row in rows if row.key in no_tokens]
    return OpenedIndex(index, [row for row in rows if row.key not in no_tokens], bad_keys, rebuilt=False)


def open_index(cache_dir: CacheDir, repair: bool = True) -> OpenedIndex:
    """The index, checked; a damaged one is set aside and replaced by an empty one if `repair`.

    Without `repair` (a reader that does not hold the directory lock) damage raises sqlite3.DatabaseError.
    """
    try:
        return _open_checked(cache_dir)
    except sqlite3.Error as exc:
        if not repair or not is_damage(exc):
            raise
        reason = exc
    moved = set_index_aside(cache_dir)
    log.warning("disk cache index %s is damaged (%s); moved to %s, rebuilding it from the entry files",
                cache_dir.index_path, reason, ", ".join(str(p) for p in moved) or "nowhere (it was missing)")  # fmt: skip
    opened = _open_checked(cache_dir)  # a fresh database: an error here is not about the old bytes, so it raises
    opened.rebuilt = True
    return opened
