"""Shared fakes for the disk tier tests: raw-bytes payloads derived from their key, chains, consistency checks.

Payloads are a function of the entry's key (and size), so a test can tell a
right payload from a wrong one without remembering what it stored. Nothing
here imports torch: crash tests start many subprocesses that import this.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from kvcellar.cache import BlockHash, CacheEntry, NamespaceSpec, Priority, hash_block, hash_tail, namespace_digest
from kvcellar.tiers.codec import RawCodec
from kvcellar.tiers.disk.tier import DiskTier
from kvcellar.tiers.disk.state import INDEX_SLACK_BYTES
from kvcellar.tiers.disk.index import DiskIndex

B = 4  # tokens per block
ROOT_A = namespace_digest(NamespaceSpec("model-a", "float32", B, 1, True))
ROOT_B = namespace_digest(NamespaceSpec("model-b", "float32", B, 1, True))


def size_for(key: bytes) -> int:
    return 256 + key[0] * 8  # 256..2296 bytes, fixed per key


def payload_for(key: bytes) -> dict[str, bytes]:
    seed = hashlib.sha256(key).digest()
    body = (seed * (size_for(key) // 32 + 1))[: size_for(key)]
    return {"0.keys": body, "0.values": body[::-1][: len(body) // 2]}


def make_block(
    parent: BlockHash, tokens: Sequence[int], root: BlockHash = ROOT_A, priority: Priority = Priority.USER,
    stepped: bool = False,
) -> CacheEntry:
    key = hash_block(parent, tokens, stepped)
    body = payload_for(key)
    size = sum(len(v) for v in body.values())
    return CacheEntry(key, parent, tuple(tokens), size, priority, body, is_tail=False, namespace=root)


def make_partial(
    parent: BlockHash, tokens: Sequence[int], root: BlockHash = ROOT_A, has_logits: bool = False
) -> CacheEntry:
    key = hash_tail(parent, tokens)
    body = payload_for(key)
    if has_logits:
        body = {**body, "logits": b"\x01" * 64}
    size = sum(len(v) for v in body.values())
    return CacheEntry(key, parent, tuple(tokens), size, Priority.USER, body, True, has_logits=has_logits, namespace=root)


def chain(tokens: Sequence[int], root: BlockHash = ROOT_A, priority: Priority = Priority.USER) -> list[CacheEntry]:
    """The block entries of every full block of `tokens`."""
    entries, parent = [], root
    for start in range(0, len(tokens) - B + 1, B):
        entry = make_block(parent, tokens[start : start + B], root, priority)
        entries.append(entry)
        parent = entry.key
    return entries


def open_tier(path: Path, budget_bytes: int = 1 << 20, **options: object) -> DiskTier:
    return DiskTier(path, budget_bytes, RawCodec(), **options)


def index_share(tier: DiskTier) -> int:
    """The budget's bytes the index holds now (database, WAL, shm, slack): a budget of this plus N fits N file bytes."""
    return tier.stats().counters["index_bytes"] + INDEX_SLACK_BYTES


def store(tier: DiskTier, entry: CacheEntry) -> bool:
    result = tier.prepare_store(entry)
    if result.accepted:
        tier.complete_store(entry.key)
    return result.accepted


def file_of(tier: DiskTier, entry: CacheEntry) -> Path:
    return tier.cache_dir / "entries-v1" / entry.namespace.hex()[:16] / entry.key.hex()[:2] / f"{entry.key.hex()}.safetensors"


def entry_files(path: Path) -> list[Path]:
    return sorted((path / "entries-v1").rglob("*.safetensors"))


def check_consistent(tier: DiskTier) -> int:
    """Every index row has its file, every file its row, every entry loads with its own payload; returns the count."""
    index = DiskIndex(tier.cache_dir / "index.sqlite3")
    try:
        rows = {row.key for row in index.rows()}
    finally:
        index.close()
    files = {bytes.fromhex(p.name[:64]) for p in entry_files(tier.cache_dir)}
    entries = tier.entries()
    assert rows == files == {e.key for e in entries}, "index, files and catalog disagree"
    assert not list(tier.cache_dir.rglob("*.tmp")), "temp files left behind"
    for entry in entries:
        (loaded,) = tier.prepare_load([entry.key])
        assert loaded.payload == payload_for(entry.key) or loaded.payload == {**payload_for(entry.key), "logits": b"\x01" * 64}
    assert tier.stats().counters.get("num_corrupt", 0) == 0
    return len(entries)
