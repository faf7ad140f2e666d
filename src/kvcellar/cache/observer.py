"""One object receives every cache event (metrics, logs, dashboards).

Operations: `CacheObserver` (the protocol) and `NullObserver` (does nothing).
`PrefixCache` always calls its observer; "no metrics" is a `NullObserver`, not
a flag checked on every event. Observers run under the cache lock: they must
be fast and must not call back into the cache's mutating methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from kvcellar.cache.entry import CacheEntry

if TYPE_CHECKING:
    from kvcellar.cache.match import Match


class CacheObserver(Protocol):
    def on_lookup(self, match: Match, num_prompt_tokens: int) -> None:
        """A lookup finished; `match` is what the caller will restore."""

    def on_evict(self, entry: CacheEntry, tier_name: str) -> None:
        """`entry` left the tier `tier_name` (for space, for the tail count limit, or by discard)."""

    def on_store(self, entry: CacheEntry, tier_name: str) -> None:
        """A new entry became visible in the tier `tier_name`."""

    def on_refuse(self, entry: CacheEntry, reason: str) -> None:
        """An insert was refused; nothing was evicted for it."""


class NullObserver:
    """The observer of a cache nobody watches."""

    def on_lookup(self, match: Match, num_prompt_tokens: int) -> None:
        pass

    def on_evict(self, entry: CacheEntry, tier_name: str) -> None:
        pass

    def on_store(self, entry: CacheEntry, tier_name: str) -> None:
        pass

    def on_refuse(self, entry: CacheEntry, reason: str) -> None:
        pass
