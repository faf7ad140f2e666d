"""The eviction planner every tier uses: which entries to remove to free bytes, in policy order.

Operations: `EvictionPlanner.offer` (the tier reports an item that may have
become a candidate, or whose order changed), `.plan` (the victims that free
a number of bytes, or None), `.rebuild` (a fresh heap from every item);
`EvictionSource` (what the planner asks the tier), `Evictable` (what an item
carries).

Eviction order (the tier's invariants, enforced here):
- Candidates are evictable items (the tier's rule: visible and unpinned)
  that are leaves: no item of any state names them as parent. A parent
  becomes a candidate once every child is planned for eviction, so a chain
  is cut from its end and never loses a middle link.
- Among the candidates the policy decides (cache/policy.py: the smallest
  `sort_key`, ties broken by key, is evicted first); the item the caller
  protects (the parent of the entry being stored) is never chosen.
- A plan that cannot free enough bytes returns None and changes nothing.

Candidates sit in a lazy heap of (sort key, key): the tier offers an item on
every change that may make it a candidate or change its sort key (published,
touched, unpinned, its last child removed); a popped item is used only if it
still matches its item, so planning costs O(log n) per victim whatever the
tier's size, and stale items are dropped when the heap outgrows the tier.
Not thread-safe: the tier calls it under the lock that guards its items.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Set
from typing import Generic, Protocol, TypeVar

from kvcellar.cache.entry import Priority
from kvcellar.cache.hashing import BlockHash
from kvcellar.cache.policy import EvictionPolicy


class Evictable(Protocol):
    key: BlockHash
    parent: BlockHash
    num_bytes: int
    priority: Priority
    last_used: int


E = TypeVar("E", bound=Evictable)


class EvictionSource(Protocol[E]):
    """The tier's side: its items and their parent links."""

    def evictable(self, key: BlockHash) -> E | None:
        """The item of `key` if the tier may evict it for space (visible, unpinned), leaf or not; else None."""
        ...

    def child_keys(self, key: BlockHash) -> Set[BlockHash]:
        """Keys of the items (of any state, reserved ones too) whose parent is `key`."""
        ...

    def eviction_items(self) -> Collection[E]:
        """A live view of every item that may be evictable (for `rebuild`, and its size to decide when)."""
        ...


class EvictionPlanner(Generic[E]):
    def __init__(self, policy: EvictionPolicy, source: EvictionSource[E]) -> None:
        self.policy = policy
        self._sort_key = policy.sort_key
        self._source = source
        self._heap: list[tuple[tuple[int, ...], BlockHash]] = []

    def offer(self, item: E) -> None:
        """Push `item` if it is a candidate now (call after any change that may make it one, or reorder it)."""
        if self._source.evictable(item.key) is item and not self._source.child_keys(item.key):
            heapq.heappush(self._heap, (self._sort_key(item), item.key))
            if len(self._heap) > 2 * len(self._source.eviction_items()) + 1024:
                self.rebuild()

    def rebuild(self) -> None:
        """Drop stale heap items: one item per current candidate."""
        source = self._source
        self._heap = [
            (self._sort_key(item), item.key)
            for item in source.eviction_items()
            if source.evictable(item.key) is item and not source.child_keys(item.key)
        ]
        heapq.heapify(self._heap)

    def plan(self, num_bytes_needed: int, protected: BlockHash | None) -> list[E] | None:
        """Candidates freeing `num_bytes_needed` bytes, in eviction order, or None (and nothing changes).

        The caller removes the victims (offering their parents as it does). A parent whose children
        are all chosen becomes a candidate within this plan.
        """
        if num_bytes_needed <= 0:
            return []
        source = self._source
        victims: list[E] = []
        chosen: set[BlockHash] = set()
        put_back: list[tuple[tuple[int, ...], BlockHash]] = []
        num_freed = 0
        while num_freed < num_bytes_needed:
            if not self._heap:
                for heap_item in put_back + [(self._sort_key(v), v.key) for v in victims]:
                    heapq.heappush(self._heap, heap_item)
                return None
            heap_item = heapq.heappop(self._heap)
            sort_key, key = heap_item
            item = source.evictable(key)
            stale = item is None or key in chosen or sort_key != self._sort_key(item)
            if stale or not source.child_keys(key) <= chosen:
                continue  # the item changed (or went) since this heap item was pushed, or is no leaf now
            if key == protected:
                put_back.append(heap_item)
                continue
            victims.append(item)
            chosen.add(key)
            num_freed += item.num_bytes
            parent = source.evictable(item.parent)
            if parent is not None and source.child_keys(item.parent) <= chosen:
                heapq.heappush(self._heap, (self._sort_key(parent), parent.key))
        for heap_item in put_back:
            heapq.heappush(self._heap, heap_item)
        return victims
