"""Turn a chosen restore point into a `Match` whose entries carry their payloads.

Operations: `load_match` (pin and load the entries of a restore point, tier
by tier, timing each tier) and `LoadFailed`.

Invariant: on any failure nothing stays pinned. A tier that cannot produce
an entry (gone, or its stored bytes failed validation) raises KeyError and
has already dropped that entry, so the caller's next lookup walks around it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence

from kvcellar.cache.entry import CacheEntry
from kvcellar.cache.hashing import BlockHash
from kvcellar.cache.match import Match, RestorePoint
from kvcellar.cache.tier import Tier


class LoadFailed(KeyError):
    """A loaded entry belongs to another namespace: the caller evicts `key` from tier `tier_index`."""

    def __init__(self, key: BlockHash, tier_index: int, reason: str) -> None:
        super().__init__(f"entry {key.hex()}: {reason}")
        self.key = key
        self.tier_index = tier_index


def restore_entries(point: RestorePoint, chain: Sequence[CacheEntry]) -> list[CacheEntry]:
    """The entries a restore at `point` reads, in restore order."""
    blocks = list(chain[: point.num_blocks])
    return [*blocks, point.entry] if point.entry is not None else blocks


def tokens_by_tier(
    point: RestorePoint, chain: Sequence[CacheEntry], where: Mapping[BlockHash, int], tiers: Sequence[Tier], block_size: int
) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for entry in restore_entries(point, chain):
        counts[tiers[where[entry.key]].name] += point.num_entry_tokens if entry is point.entry else block_size
    return {name: count for name, count in counts.items() if count}


def load_match(
    tiers: Sequence[Tier],
    point: RestorePoint,
    chain: Sequence[CacheEntry],
    where: Mapping[BlockHash, int],
    block_size: int,
    root: BlockHash,
) -> Match:
    """Pin and load every entry of `point`; raises KeyError (nothing pinned) when one cannot be loaded."""
    used = restore_entries(point, chain)
    keys_by_tier: dict[int, list[BlockHash]] = {}
    for entry in used:
        keys_by_tier.setdefault(where[entry.key], []).append(entry.key)
    loaded: dict[BlockHash, CacheEntry] = {}
    pinned: list[tuple[int, list[BlockHash]]] = []
    seconds: dict[str, float] = {}
    num_bytes: dict[str, int] = {}
    try:
        for index in sorted(keys_by_tier):  # fastest tier first: its pins are cheap to undo
            keys = keys_by_tier[index]
            started = time.perf_counter()
            entries = tiers[index].prepare_load(keys)  # pins and touches, chain order
            name = tiers[index].name
            seconds[name] = time.perf_counter() - started
            pinned.append((index, keys))
            num_bytes[name] = sum(entry.num_bytes for entry in entries)
            for key, entry in zip(keys, entries):
                if entry.namespace is not None and entry.namespace != root:
                    raise LoadFailed(key, index, "stored under another namespace")
                loaded[key] = entry
    except KeyError:
        for index, keys in pinned:
            tiers[index].complete_load(keys)
        raise
    blocks = tuple(loaded[entry.key] for entry in chain[: point.num_blocks])
    tail = loaded[point.entry.key] if point.entry is not None else None
    return Match(
        num_tokens=point.num_tokens(block_size),
        blocks=blocks,
        tail=tail,
        num_tail_tokens=point.num_entry_tokens,
        use_logits=point.use_logits,
        tokens_by_tier=tokens_by_tier(point, chain, where, tiers, block_size),
        load_s_by_tier=seconds,
        loaded_bytes_by_tier=num_bytes,
    )
