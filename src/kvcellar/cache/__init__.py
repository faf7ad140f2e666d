"""Torch-free core of the prefix KV cache: keys, entries, eviction, tiers, lookup.

A prompt is cut into blocks of `block_size` tokens; each block is named by a
chained sha256 key (`hashing`), so equal keys mean equal prefixes in one
namespace. The engine captures each block's KV state as an opaque payload of
known byte size and inserts it; a lookup returns the longest prefix every
layer kind can restore (`layout`), pinned until released.

Modules: `hashing` (keys, stable byte encoding), `layout` (what the model's
layers let a restore do), `reuse` (what a namespace may reuse: exact or near
rules, chosen once; the prefill schedule), `entry` (entries and priorities),
`policy` (eviction order), `eviction` (the eviction planner every tier uses),
`tails` (the count bound on tail entries), `tier` (storage protocol, `TierStats`),
`match` (restore-point rules), `loading` (pin and load a match), `movement`
(promotion, demotion, write-through between tiers), `prefix_cache`
(`PrefixCache`: lookup / insert / discard / stats), `stats`, `observer`,
`cost_model` (restore or recompute). Persistent tiers (disk) live in
`kvcellar.tiers`, which implements the same `Tier` protocol.
No module here imports torch or numpy; tensors exist only in payloads.
"""

from kvcellar.cache.entry import CacheEntry, Priority
from kvcellar.cache.hashing import (
    BlockHash,
    NamespaceSpec,
    hash_block,
    hash_blocks,
    hash_tail,
    namespace_digest,
)
from kvcellar.cache.layout import LayoutCapabilities
from kvcellar.cache.match import Match
from kvcellar.cache.observer import CacheObserver, NullObserver
from kvcellar.cache.policy import EVICTION_POLICIES, LRU, EvictionPolicy, PriorityLRU, make_policy
from kvcellar.cache.prefix_cache import PrefixCache
from kvcellar.cache.stats import CacheStats
from kvcellar.cache.tier import TIER_NAMES, StoreResult, Tier, TierStats

__all__ = [
    "EVICTION_POLICIES",
    "LRU",
    "TIER_NAMES",
    "BlockHash",
    "CacheEntry",
    "CacheObserver",
    "CacheStats",
    "EvictionPolicy",
    "LayoutCapabilities",
    "Match",
    "NamespaceSpec",
    "NullObserver",
    "PrefixCache",
    "Priority",
    "PriorityLRU",
    "StoreResult",
    "Tier",
    "TierStats",
    "hash_block",
    "hash_blocks",
    "hash_tail",
    "make_policy",
    "namespace_digest",
]
