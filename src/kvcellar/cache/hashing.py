"""Content addresses of cache entries: namespace digests and chained block hashes.

Operations: `namespace_digest` (the root of every chain in one namespace),
`hash_block` (key of a full block), `hash_tail` (key of a sub-block entry),
`hash_blocks` (keys of all full blocks of a prompt).

Byte encoding (stable: it names files on disk and keys in shared stores, so a
change here needs a new domain tag, never Python's `hash()` or pickle):

- namespace digest = sha256(b"kvcellar-namespace-v1\\x00" + J) where J is the
  UTF-8 encoding of the JSON object of the `NamespaceSpec` fields, written
  with sorted keys, separators (",", ":") and ASCII escapes; an optional
  field whose value is None is left out (so adding one keeps older digests).
- block key = sha256(b"kvcellar-block-v1\\x00" + parent + count + tokens)
  where parent is the 32-byte parent key (the namespace digest for the first
  block), count is the number of tokens as uint32 little-endian and tokens
  are the token ids, each as uint32 little-endian.
- stepped block key = the same with the tag b"kvcellar-stepped-block-v1\\x00":
  a block prefilled on its own after the prompt's last full chunk. Only the
  exact reuse rule over chunks longer than a block keys blocks so
  (cache/reuse.py `ChunkedExactReuse`, through `hash_blocks(stepped_from=)`):
  their K/V differ in rounding from the same tokens computed inside a chunk,
  so they must not share their key.
- tail key = the same with the tag b"kvcellar-partial-v1\\x00" (the tag
  keeps its first name: it is in every stored key). The distinct tag
  guarantees a tail key never equals a block key.

Chain: h_0 = block key(root, tokens[0:B]), h_i = block key(h_{i-1},
tokens[iB:(i+1)B]); equal keys mean equal namespace and equal prefix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NewType

from kvcellar.checks import is_int

BlockHash = NewType("BlockHash", bytes)
"""A 32-byte sha256 digest naming a namespace root, a block or a tail entry."""

HASH_NUM_BYTES = 32
MAX_TOKEN_ID = 2**32 - 1

_NAMESPACE_TAG = b"kvcellar-namespace-v1\x00"
_BLOCK_TAG = b"kvcellar-block-v1\x00"
_STEPPED_BLOCK_TAG = b"kvcellar-stepped-block-v1\x00"
_TAIL_TAG = b"kvcellar-partial-v1\x00"


@dataclass(frozen=True)
class NamespaceSpec:
    """Everything that makes two caches incompatible; each field changes the root digest."""

    model_fingerprint: str  # config + weights identity
    dtype: str
    block_size: int
    layout_version: int  # payload layout of the tensor side
    exact: bool  # bit-exact mode (block-aligned prefill)
    tenant_salt: str = ""  # isolates tenants (timing side channel)
    # Prefill chunk when longer than a block, under either reuse rule: K/V computed in longer chunks round
    # differently, so they live in a namespace of their own (None, one block, keeps the older digests).
    chunk_size: int | None = None
    # The prefill schedule when it is not the fixed one ("row-invariant"): its attention runs in query
    # pieces and rounds differently from the fixed schedule's (None keeps the older digests).
    schedule: str | None = None
    # Exact mode: where K/V are computed (device kind, kernel level, torch version). Two machines that
    # round differently must not share exact entries through a shared tier (None keeps the older digests).
    compute: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model_fingerprint, str) or not self.model_fingerprint:
            raise ValueError("model_fingerprint must be a non-empty string identifying the model's config and weights")
        if not isinstance(self.dtype, str) or not self.dtype:
            raise ValueError("dtype must be a non-empty string such as 'bfloat16'")
        if not is_int(self.block_size) or self.block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {self.block_size!r}")
        if not is_int(self.layout_version) or self.layout_version < 0:
            raise ValueError(f"layout_version must be an integer >= 0, got {self.layout_version!r}")
        if not isinstance(self.exact, bool):
            raise ValueError(f"exact must be True or False, got {self.exact!r}")
        if not isinstance(self.tenant_salt, str):
            raise ValueError(f"tenant_salt must be a string, got {type(self.tenant_salt).__name__}")
        if self.chunk_size is not None and (not is_int(self.chunk_size) or self.chunk_size % self.block_size):
            raise ValueError(f"chunk_size must be None or a multiple of block_size, got {self.chunk_size!r}")

    def with_salt(self, salt: str) -> NamespaceSpec:
        """A copy of this spec in the tenant namespace `salt`."""
        return dataclasses.replace(self, tenant_salt=salt)


def namespace_digest(spec: NamespaceSpec) -> BlockHash:
    """Root key of the namespace `spec`: the parent of every first block."""
    fields = {name: value for name, value in dataclasses.asdict(spec).items() if value is not None}
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return BlockHash(hashlib.sha256(_NAMESPACE_TAG + text.encode("utf-8")).digest())


def hash_block(parent: BlockHash, token_ids: Sequence[int], stepped: bool = False) -> BlockHash:
    """Key of the full block `token_ids` that follows the entry keyed `parent` (`stepped`: see the module doc)."""
    return _chained(_STEPPED_BLOCK_TAG if stepped else _BLOCK_TAG, parent, token_ids)


def hash_tail(parent: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    """Key of the sub-block entry `token_ids` after `parent` (never equal to a block key)."""
    return _chained(_TAIL_TAG, parent, token_ids)


def hash_blocks(
    root: BlockHash, token_ids: Sequence[int], block_size: int, stepped_from: int | None = None
) -> list[BlockHash]:
    """Chained keys of the full blocks of `token_ids`; a trailing incomplete block gets none.

    Blocks starting at or after `stepped_from` (a token position) get stepped keys.
    """
    if not is_int(block_size) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
    keys: list[BlockHash] = []
    parent = root
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        stepped = stepped_from is not None and start >= stepped_from
        parent = hash_block(parent, token_ids[start : start + block_size], stepped)
        keys.append(parent)
    return keys


def _chained(tag: bytes, parent: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    if not isinstance(parent, bytes) or len(parent) != HASH_NUM_BYTES:
        raise ValueError(f"parent must be a {HASH_NUM_BYTES}-byte digest (a BlockHash), got {parent!r:.80}")
    count = len(token_ids)
    try:
        # One pack call both encodes and range-checks: "<" means little-endian, no padding.
        body = struct.pack(f"<I{count}I", count, *token_ids)
    except struct.error:
        raise ValueError(_bad_token_message(token_ids)) from None
    return BlockHash(hashlib.sha256(tag + parent + body).digest())


def _bad_token_message(token_ids: Sequence[int]) -> str:
    for index, token in enumerate(token_ids):
        if not is_int(token) or not 0 <= token <= MAX_TOKEN_ID:
            return f"token id {token!r} at index {index} is not an integer in [0, 2**32); pass the tokenizer's ids"
    return "token ids could not be encoded as uint32"

