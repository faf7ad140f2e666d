"""One object receives every cache event (metrics, logs, dashboards).

Operations: `CacheObserver` (the protocol), `NullObserver` (does nothing),
`LoggingObserver(logger)` (the engine's: each refused store and each
eviction becomes a DEBUG line, so `--log-level debug` shows why a block was
not kept; counters stay in `CacheStats`), `ObserverGroup` (several observers
as one: logs and KV events, kvcellar/events). `PrefixCache` always calls its
observer; "no metrics" is a `NullObserver`, not a flag checked on every
event. `CacheRegistry` hands its one observer to every core it creates.
Observers run under the cache lock: they must be fast and must not call
back into the cache's mutating methods.
"""

from __future__ import annotations

import logging
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

    def on_clear(self, tier_name: str | None) -> None:
        """Every entry of the tier `tier_name` (None: of every tier) was dropped."""


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

    def on_clear(self, tier_name: str | None) -> None:
        pass


class ObserverGroup:
    """Several observers as one, called in order."""

    def __init__(self, *observers: CacheObserver) -> None:
        self.observers = observers

    def on_lookup(self, match: Match, num_prompt_tokens: int) -> None:
        for observer in self.observers:
            observer.on_lookup(match, num_prompt_tokens)

    def on_evict(self, entry: CacheEntry, tier_name: str) -> None:
        for observer in self.observers:
            observer.on_evict(entry, tier_name)

    def on_store(self, entry: CacheEntry, tier_name: str) -> None:
        for observer in self.observers:
            observer.on_store(entry, tier_name)

    def on_refuse(self, entry: CacheEntry, reason: str) -> None:
        for observer in self.observers:
            observer.on_refuse(entry, reason)

    def on_clear(self, tier_name: str | None) -> None:
        for observer in self.observers:
            observer.on_clear(tier_name)


class LoggingObserver:
    """Logs what the counters cannot say: which entry a tier refused and why, which one it evicted.

    Lookups and stores are not logged (one per block, and the server logs a HIT/MISS line per
    request); at any level above DEBUG each event costs one `isEnabledFor` check.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger

    def on_lookup(self, match: Match, num_prompt_tokens: int) -> None:
        pass

    def on_evict(self, entry: CacheEntry, tier_name: str) -> None:
        if self._log.isEnabledFor(logging.DEBUG):
            self._log.debug("evicted %s from %s (%d tokens, %d bytes, %s)", _describe(entry), tier_name,
                            len(entry.token_ids), entry.num_bytes, entry.priority.name)  # fmt: skip

    def on_store(self, entry: CacheEntry, tier_name: str) -> None:
        pass

    def on_refuse(self, entry: CacheEntry, reason: str) -> None:
        if self._log.isEnabledFor(logging.DEBUG):
            self._log.debug("not stored: %s (%d tokens, %d bytes): %s", _describe(entry), len(entry.token_ids),
                            entry.num_bytes, reason)  # fmt: skip

    def on_clear(self, tier_name: str | None) -> None:
        self._log.info("cache cleared (%s)", tier_name or "every tier")


def _describe(entry: CacheEntry) -> str:
    return f"{'tail' if entry.is_tail else 'block'} {entry.key.hex()[:12]}"
