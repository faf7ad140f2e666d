"""How entries are laid out in Redis/Valkey: key names and the small metadata record of each entry.

Operations: `entry_key` (the entry's bytes: tiers/blob.py's checksummed
format, the disk tier's file), `children_key` (a hash per parent: field =
child key, value = its `encode_meta` record), `encode_meta` / `decode_meta`.

Why a hash per parent: a lookup walks a chain of blocks, and each block's
parent is the one before it, so asking `HGET children(parent_i) key_i` for
every block is one pipelined round trip for the whole chain; the children
of the chain's end (tails, and siblings a near-mode lookup trims) are one
`HGETALL`. Every name starts with the configured prefix, so a Redis ACL can
confine a deployment to `~<prefix>*`.

A key already digests the namespace (model, layout, block size, salt: the
chain starts at the namespace root), so two servers share an entry exactly
when they share a namespace. The record repeats the namespace, so a read
checks it before trusting the entry.

Faults: the server may evict an entry but keep its record, or the reverse
(allkeys-lru evicts keys one by one): a record without its entry is a miss
found at load time; an entry without its record is unreachable and left to
the server's LRU.
"""

from __future__ import annotations

import struct

from kvcellar.cache.entry import CacheEntry, Priority
from kvcellar.cache.hashing import HASH_NUM_BYTES, BlockHash

META_VERSION = 1
_HEAD = struct.Struct(f"<BBBQ{HASH_NUM_BYTES}s{HASH_NUM_BYTES}s")  # version, flags, priority, payload bytes, parent, namespace
_TAIL, _LOGITS = 1, 2


def entry_key(prefix: str, key: BlockHash) -> bytes:
    return f"{prefix}e:{key.hex()}".encode()


def children_key(prefix: str, parent: BlockHash) -> bytes:
    return f"{prefix}c:{parent.hex()}".encode()


def encode_meta(entry: CacheEntry) -> bytes:
    """The record of `entry` (its namespace must be set): what a lookup needs, without the payload."""
    if entry.namespace is None:
        raise ValueError("an entry needs its namespace to be stored in the remote tier")
    flags = (_TAIL if entry.is_tail else 0) | (_LOGITS if entry.has_logits else 0)
    head = _HEAD.pack(META_VERSION, flags, int(entry.priority), entry.num_bytes, entry.parent, entry.namespace)
    return head + struct.pack(f"<{entry.num_tokens}I", *entry.token_ids)


def decode_meta(key: BlockHash, record: bytes) -> CacheEntry:
    """The metadata-only entry (payload None) a record describes; ValueError for a record that is not one."""
    if len(record) < _HEAD.size or (len(record) - _HEAD.size) % 4:
        raise ValueError(f"remote record of {len(record)} bytes is not a kvcellar record")
    version, flags, priority, num_bytes, parent, namespace = _HEAD.unpack_from(record)
    if version != META_VERSION or flags & ~(_TAIL | _LOGITS) or priority not in {int(p) for p in Priority}:
        raise ValueError("remote record has an unknown version, flag or priority")
    count = (len(record) - _HEAD.size) // 4
    tokens = struct.unpack_from(f"<{count}I", record, _HEAD.size)
    return CacheEntry(key, parent, tokens, num_bytes, Priority(priority), None, is_tail=bool(flags & _TAIL),
                      has_logits=bool(flags & _LOGITS), namespace=namespace)  # fmt: skip
