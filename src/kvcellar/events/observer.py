"""The cache's stores, evictions and clears as KV events (format.py), handed to a publisher.

Operations: `KVEventObserver(publisher, block_size, device_type)` (a
`CacheObserver`). Published: whole blocks in this server's own tiers
(device, host, disk), each as it becomes visible (`BlockStored`) or leaves
(`BlockRemoved`), and `AllBlocksCleared` when a tier is cleared. A block
demoted from memory to disk is removed from one medium and stored in the
other. Not published: tails (sub-block entries; vLLM publishes whole blocks
only) and the remote tier (shared by every server: it tells a router
nothing about where a prefix is warmest).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvcellar.cache.entry import CacheEntry
from kvcellar.events.format import all_blocks_cleared, block_removed, block_stored

if TYPE_CHECKING:
    from kvcellar.cache.match import Match
    from kvcellar.events.publisher import EventPublisher


def medium_of(tier_name: str, device_type: str) -> str | None:
    """vLLM's medium name for a tier of a model on `device_type`; None for a tier not published."""
    if tier_name == "device":
        return "CPU" if device_type == "cpu" else "GPU"
    return {"host": "CPU", "disk": "STORAGE"}.get(tier_name)


class KVEventObserver:
    def __init__(self, publisher: EventPublisher, block_size: int, device_type: str) -> None:
        self._publisher = publisher
        self._block_size = block_size
        self._device_type = device_type

    def on_store(self, entry: CacheEntry, tier_name: str) -> None:
        medium = medium_of(tier_name, self._device_type)
        if medium is None or entry.is_tail:
            return
        parent = None if entry.parent == entry.namespace else entry.parent
        self._publisher.publish(block_stored([entry.key], parent, entry.token_ids,
                                             self._block_size, medium))  # fmt: skip

    def on_evict(self, entry: CacheEntry, tier_name: str) -> None:
        medium = medium_of(tier_name, self._device_type)
        if medium is not None and not entry.is_tail:
            self._publisher.publish(block_removed([entry.key], medium))

    def on_clear(self, tier_name: str | None) -> None:
        if tier_name is None or medium_of(tier_name, self._device_type) is not None:
            self._publisher.publish(all_blocks_cleared())

    def on_lookup(self, match: Match, num_prompt_tokens: int) -> None:
        pass

    def on_refuse(self, entry: CacheEntry, reason: str) -> None:
        pass
