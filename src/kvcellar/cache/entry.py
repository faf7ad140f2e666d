"""One cached unit of KV state and its eviction priority.

Operations: `Priority` (what a chat segment is worth keeping) and
`CacheEntry` (key, parent, tokens, opaque payload, byte size, bookkeeping).

A block entry holds exactly block_size tokens; a tail entry holds
0..block_size-1 tokens that follow its parent (a block or the namespace root).
A 0-token tail exists only to carry the next-token logits at the end of its
parent chain (has_logits=True). The block size is checked by `PrefixCache`,
which knows it; an entry checks only what it can see.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import IntEnum

from kvcellar.cache.hashing import HASH_NUM_BYTES, BlockHash
from kvcellar.checks import is_int


class Priority(IntEnum):
    """Higher is kept longer: eviction takes assistant text before user turns before system prompts."""

    ASSISTANT = 0
    USER = 1
    SYSTEM = 2


@dataclass(eq=False)
class CacheEntry:
    """A block or tail entry. Identity equality: two objects are two residents, even with one key.

    Ownership: a tier owns `last_used` and `num_pins` (it writes them under its
    owner's lock); the payload is opaque here and never copied.
    """

    key: BlockHash
    parent: BlockHash  # the namespace root for a first block
    token_ids: tuple[int, ...]
    num_bytes: int  # bytes the payload occupies in its tier; counted against the tier's budget
    priority: Priority
    payload: object
    is_tail: bool
    has_logits: bool = False  # payload carries the next-token logits at the entry's end
    last_used: int = 0  # tier clock value of the last touch (monotonic, not wall time)
    num_pins: int = 0  # outstanding loads; a pinned entry is never evicted for space
    namespace: BlockHash | None = None  # root of the entry's chain; persistent tiers check it on read

    def __post_init__(self) -> None:
        for label, digest in (("key", self.key), ("parent", self.parent), ("namespace", self.namespace)):
            if label == "namespace" and digest is None:
                continue
            if not isinstance(digest, bytes) or len(digest) != HASH_NUM_BYTES:
                raise ValueError(f"{label} must be a {HASH_NUM_BYTES}-byte BlockHash, got {digest!r:.80}")
        self.token_ids = tuple(self.token_ids)
        if not is_int(self.num_bytes) or self.num_bytes < 0:
            raise ValueError(f"num_bytes must be an integer >= 0, got {self.num_bytes!r}")
        self.priority = Priority(self.priority)
        if not self.token_ids and not (self.is_tail and self.has_logits):
            raise ValueError("an entry with 0 tokens must be a tail entry (is_tail=True) with has_logits=True")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def copy_for_tier(self, payload: object | None = None) -> CacheEntry:
        """A fresh, unpinned copy for another tier (a tier owns `last_used` and `num_pins` of its objects)."""
        return dataclasses.replace(
            self, payload=self.payload if payload is None else payload, last_used=0, num_pins=0
        )
