"""Eviction order: small strategy classes chosen by name from a table.

Operations: `EvictionPolicy.sort_key` (smallest key is evicted first),
`EVICTION_POLICIES` (name -> class: the only list of policy names; config,
CLI and tiers read it), `DEFAULT_EVICTION_POLICY`, `make_policy` (validated
lookup).

A policy only orders candidates; which entries are candidates (unpinned
leaves) is the planner's rule (eviction.py), so every policy keeps chains
intact.
"""

from __future__ import annotations

from typing import Protocol

from kvcellar.cache.entry import CacheEntry


class EvictionPolicy(Protocol):
    name: str

    def sort_key(self, entry: CacheEntry) -> tuple[int, ...]:
        """Order key: the candidate with the smallest key is evicted first."""
        ...


class PriorityLRU:
    """Lowest priority first (assistant, then user, then system); least recently used within one priority."""

    name = "priority-lru"

    def sort_key(self, entry: CacheEntry) -> tuple[int, ...]:
        return (int(entry.priority), entry.last_used)


class LRU:
    """Least recently used first; priority is ignored."""

    name = "lru"

    def sort_key(self, entry: CacheEntry) -> tuple[int, ...]:
        return (entry.last_used,)


EVICTION_POLICIES: dict[str, type[EvictionPolicy]] = {policy.name: policy for policy in (PriorityLRU, LRU)}
DEFAULT_EVICTION_POLICY = PriorityLRU.name


def make_policy(name: str) -> EvictionPolicy:
    """The policy registered as `name`."""
    try:
        return EVICTION_POLICIES[name]()
    except KeyError:
        choices = ", ".join(sorted(EVICTION_POLICIES))
        raise ValueError(f"unknown eviction policy {name!r}; choose one of: {choices}") from None
