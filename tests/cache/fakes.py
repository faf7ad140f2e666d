"""Shared fakes for the cache tests: a tiny block size, string payloads, explicit byte sizes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kvcellar.cache import (
    BlockHash,
    CacheEntry,
    LayoutCapabilities,
    Match,
    NamespaceSpec,
    PrefixCache,
    Priority,
    hash_block,
    namespace_digest,
)
from kvcellar.cache.reuse import NEAR, ReuseRule
from kvcellar.tiers.memory import MemoryTier

B = 4  # block size of every test cache
ROOT = namespace_digest(NamespaceSpec("test-model", "float32", B, 1, False))
ATTENTION = LayoutCapabilities(block_size=B, has_recurrent=False, sliding_window=None)
RECURRENT = LayoutCapabilities(block_size=B, has_recurrent=True, sliding_window=None)
SMALL_WINDOW = LayoutCapabilities(block_size=B, has_recurrent=False, sliding_window=B)  # keeps only B - 1 tokens


def payload(tokens: Sequence[int]) -> str:
    return "kv:" + ",".join(map(str, tokens))


def make_entry(name: str, num_bytes: int = 10, priority: Priority = Priority.USER, parent: BlockHash = ROOT) -> CacheEntry:
    """A block entry whose tokens are derived from `name`, so distinct names give distinct keys."""
    tokens = tuple(ord(ch) for ch in name.ljust(B, "_")[:B])
    return CacheEntry(hash_block(parent, tokens), parent, tokens, num_bytes, priority, name, is_tail=False)


def store(tier: MemoryTier, entry: CacheEntry) -> CacheEntry:
    result = tier.prepare_store(entry)
    assert result.accepted, result.reason
    tier.complete_store(entry.key)
    return entry


@dataclass
class RecordingObserver:
    events: list[tuple] = field(default_factory=list)

    def on_lookup(self, match: Match, num_prompt_tokens: int) -> None:
        self.events.append(("lookup", match.num_tokens, num_prompt_tokens))

    def on_evict(self, entry: CacheEntry, tier_name: str) -> None:
        self.events.append(("evict", entry.token_ids, tier_name))

    def on_store(self, entry: CacheEntry, tier_name: str) -> None:
        self.events.append(("store", entry.token_ids, tier_name))

    def on_refuse(self, entry: CacheEntry, reason: str) -> None:
        self.events.append(("refuse", entry.token_ids, reason))

    def on_clear(self, tier_name: str | None) -> None:
        self.events.append(("clear", tier_name))


def make_cache(
    capabilities: LayoutCapabilities = ATTENTION,
    budget_bytes: int = 10_000,
    max_tail_entries: int = 8,
    observer: RecordingObserver | None = None,
    reuse: ReuseRule = NEAR,
) -> PrefixCache:
    tier = MemoryTier(budget_bytes)
    return PrefixCache(ROOT, capabilities, [tier], reuse=reuse, max_tail_entries=max_tail_entries, observer=observer)


def insert_chain(
    cache: PrefixCache, tokens: Sequence[int], num_bytes: int = 10, priority: Priority = Priority.USER
) -> list[BlockHash]:
    """Insert every full block of `tokens`; returns their keys (stops at the first refusal)."""
    keys: list[BlockHash] = []
    parent = cache.root
    for start in range(0, len(tokens) - B + 1, B):
        block = tokens[start : start + B]
        key = cache.insert_block(parent, block, payload(block), num_bytes, priority)
        if key is None:
            break
        keys.append(key)
        parent = key
    return keys


def restored_tokens(match: Match) -> list[int]:
    """The prompt tokens a restore from `match` reproduces."""
    tokens = [t for block in match.blocks for t in block.token_ids]
    if match.tail is not None:
        tokens.extend(match.tail.token_ids[: match.num_tail_tokens])
    return tokens
