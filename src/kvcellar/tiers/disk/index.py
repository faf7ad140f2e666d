"""The disk tier's index: one SQLite database (WAL mode) describing every entry file.

Operations: `DiskIndex.scan` (every entry, no token ids: what start-up
reads; rows with a value that could raise later are set apart), `rows`,
`tokens` (token ids of some keys; rows whose bytes cannot be token ids are
left out), `check_schema`, `keys_without_tokens`, `delete_stray_tokens`
(start-up's audit, index_repair.py), `put`, `delete`, `update_recency`,
`commit` (checkpoints the WAL back into the database once it passes
WAL_CHECKPOINT_BYTES), `size_bytes` (database + WAL + shared-memory file:
what the index occupies on disk, counted in the tier's budget), `close`;
`IndexRow`.

Crash safety (the files are the truth, the index is a fast summary of them):
- a row is inserted only after its file is durable (written, fsynced,
  renamed, folder fsynced): a row never names a file that was never complete;
- a file is unlinked before its row is deleted: a crash in between leaves a
  row without a file, which start-up drops;
- a crash between a file's rename and its row's commit leaves an orphan file,
  which start-up indexes from its header. `synchronous=NORMAL` may lose the
  last commits on power loss, never consistency, so both cases stay covered.
Token ids live in their own table so start-up reads only the small rows.
Threads: a connection is used by one thread at a time (its owner's lock).
"""

from __future__ import annotations

import sqlite3
import sys
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvcellar.cache.hashing import HASH_NUM_BYTES
from kvcellar.tiers.format import MAX_HEADER_BYTES, PRIORITY_VALUES

# The column names are the on-disk format: `is_partial` holds what the code calls a tail (IndexRow.is_tail).
SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key BLOB PRIMARY KEY,
    parent BLOB NOT NULL,
    namespace BLOB NOT NULL,
    num_bytes INTEGER NOT NULL,      -- file size
    payload_bytes INTEGER NOT NULL,  -- tensor bytes (what the entry occupies in memory)
    priority INTEGER NOT NULL,
    last_used INTEGER NOT NULL,      -- the tier's logical clock, persisted
    num_tokens INTEGER NOT NULL,
    is_partial INTEGER NOT NULL,
    has_logits INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tokens (key BLOB PRIMARY KEY, token_ids BLOB NOT NULL);
"""
# tokens keeps its rowid: a WITHOUT ROWID row over ~1/4 page (256 tokens = 1 KiB) spills into an overflow page.
MAX_CLOCK = 1 << 62  # last_used past this would overflow SQLite's 64-bit integers as the clock advances
# SQLite's own auto-checkpoint (1000 pages) keeps a ~4 MB WAL file on disk: commit() truncates it
# past this size instead, so the index's share of the budget stays small and known (state.py).
WAL_CHECKPOINT_BYTES = 64 << 10
_COLUMNS = "key, parent, namespace, num_bytes, payload_bytes, priority, last_used, num_tokens, is_partial, has_logits"


@dataclass(slots=True)
class IndexRow:
    key: bytes
    parent: bytes
    namespace: bytes
    num_bytes: int
    payload_bytes: int
    priority: int
    last_used: int
    num_tokens: int
    is_tail: bool
    has_logits: bool


def row_problem(values: tuple) -> str | None:
    """Why a raw `entries` row cannot be used (a value that would raise, or break the budget, later), or None."""
    key, parent, namespace, num_bytes, payload_bytes, priority, last_used, num_tokens, is_tail, has_logits = values
    if not all(isinstance(d, bytes) and len(d) == HASH_NUM_BYTES for d in (key, parent, namespace)):
        return f"key, parent and namespace must be {HASH_NUM_BYTES}-byte blobs"
    if key == parent:
        return "the entry is its own parent"
    counts = (num_bytes, payload_bytes, priority, last_used, num_tokens, is_tail, has_logits)
    if not all(type(value) is int for value in counts):
        return "a count or flag is not an integer"
    if priority not in PRIORITY_VALUES or is_tail not in (0, 1) or has_logits not in (0, 1):
        return "priority or flag out of range"
    if not 0 <= last_used < MAX_CLOCK or not 0 <= num_tokens < MAX_CLOCK:
        return "last_used or num_tokens out of range"
    if not 0 <= payload_bytes < num_bytes - 8 <= payload_bytes + MAX_HEADER_BYTES:
        return f"num_bytes {num_bytes} cannot be a file of {payload_bytes} payload bytes"
    return None


def pack_tokens(token_ids: Sequence[int]) -> bytes:
    packed = array("I", token_ids)
    if sys.byteorder == "big":  # pragma: no cover - stored little-endian everywhere
        packed.byteswap()
    return packed.tobytes()


def unpack_tokens(data: bytes) -> tuple[int, ...]:
    packed = array("I")
    packed.frombytes(data)
    if sys.byteorder == "big":  # pragma: no cover
        packed.byteswap()
    return tuple(packed)


def _columns_of(db: sqlite3.Connection, table: str) -> list[str]:
    return [name for _, name, *_ in db.execute(f"PRAGMA table_info({table})")]


class DiskIndex:
    def __init__(self, path: Path) -> None:
        self.path = path
        # Autocommit mode; put/delete/update open one explicit transaction that commit() ends.
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(f"PRAGMA journal_size_limit={WAL_CHECKPOINT_BYTES}")  # also after SQLite's own checkpoints
        self._db.executescript(SCHEMA)
        self._in_transaction = False

    def scan(self) -> tuple[list[IndexRow], list[object]]:
        """(rows that pass `row_problem`, keys of those that do not, as stored: delete them by these)."""
        good, bad = [], []
        for values in self._db.execute(f"SELECT {_COLUMNS} FROM entries"):
            if row_problem(values) is None:
                k, p, n, b, pb, pr, lu, nt, ip, hl = values
                good.append(IndexRow(k, p, n, b, pb, pr, lu, nt, bool(ip), bool(hl)))
            else:
                bad.append(values[0])
        return good, bad

    def rows(self) -> list[IndexRow]:
        return self.scan()[0]

    def tokens(self, keys: Sequence[bytes]) -> dict[bytes, tuple[int, ...]]:
        """Token ids by key; a key whose row is missing, or holds no whole u32s, is absent."""
        found: dict[bytes, tuple[int, ...]] = {}
        for start in range(0, len(keys), 500):  # stay under SQLite's bound-parameter limit
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for key, data in self._db.execute(f"SELECT key, token_ids FROM tokens WHERE key IN ({marks})", chunk):
                if isinstance(data, bytes) and len(data) % 4 == 0:
                    found[key] = unpack_tokens(data)
        return found

    def check_schema(self) -> None:
        """sqlite3.DatabaseError unless both tables have exactly this version's columns."""
        for table, columns in (("entries", _COLUMNS.split(", ")), ("tokens", ["key", "token_ids"])):
            found = _columns_of(self._db, table)
            if found != columns:
                raise sqlite3.DatabaseError(f"table {table} has columns {found}, expected {columns}")

    def keys_without_tokens(self) -> set[bytes]:
        """Keys of entries whose token row is missing or does not hold exactly num_tokens u32s.

        Reads the record headers of the tokens table, not its blobs' content (SQLite's length()).
        """
        cursor = self._db.execute(
            "SELECT e.key FROM entries e LEFT JOIN tokens t ON t.key = e.key "
            "WHERE t.key IS NULL OR typeof(t.token_ids) != 'blob' OR length(t.token_ids) != 4 * e.num_tokens"
        )
        return {key for (key,) in cursor}

    def delete_stray_tokens(self) -> int:
        """Delete token rows no entry names (inside the open transaction); returns how many."""
        self._begin()
        return self._db.execute("DELETE FROM tokens WHERE key NOT IN (SELECT key FROM entries)").rowcount

    def _begin(self) -> None:
        if not self._in_transaction:
            self._db.execute("BEGIN")
            self._in_transaction = True

    def put(self, rows: Iterable[tuple[IndexRow, Sequence[int]]]) -> None:
        """Insert or replace rows with their token ids (inside the open transaction)."""
        self._begin()
        for row, token_ids in rows:
            self._db.execute(
                f"INSERT OR REPLACE INTO entries ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (row.key, row.parent, row.namespace, row.num_bytes, row.payload_bytes, row.priority,
                 row.last_used, row.num_tokens, int(row.is_tail), int(row.has_logits)),
            )  # fmt: skip
            self._db.execute("INSERT OR REPLACE INTO tokens (key, token_ids) VALUES (?, ?)", (row.key, pack_tokens(token_ids)))

    def delete(self, keys: Iterable[bytes]) -> None:
        self._begin()
        params = [(key,) for key in keys]
        self._db.executemany("DELETE FROM entries WHERE key = ?", params)
        self._db.executemany("DELETE FROM tokens WHERE key = ?", params)

    def update_recency(self, updates: Iterable[tuple[bytes, int, int]]) -> None:
        """(key, last_used, priority) for rows that exist; others are ignored."""
        self._begin()
        self._db.executemany("UPDATE entries SET last_used = ?, priority = ? WHERE key = ?", [(u, p, k) for k, u, p in updates])

    def rollback(self) -> None:
        if self._in_transaction:
            self._db.execute("ROLLBACK")
            self._in_transaction = False

    def commit(self) -> None:
        if self._in_transaction:
            self._db.execute("COMMIT")
            self._in_transaction = False
            if self._wal_path.exists() and self._wal_path.stat().st_size > WAL_CHECKPOINT_BYTES:
                # TRUNCATE: copy the WAL into the database and cut the file to 0 bytes. A reader in the
                # middle of a query makes it partial (SQLITE_BUSY is reported, not raised): the next commit retries.
                try:
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                except sqlite3.Error:  # e.g. the disk is full: the commit stands, the next commit retries
                    pass

    @property
    def _wal_path(self) -> Path:
        return Path(f"{self.path}-wal")

    def size_bytes(self) -> int:
        """Bytes on disk: the database, its WAL and its shared-memory index."""
        paths = (self.path, self._wal_path, Path(f"{self.path}-shm"))
        total = 0
        for path in paths:
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                continue
        return total

    def close(self) -> None:
        self.commit()
        self._db.close()
