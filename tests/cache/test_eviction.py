"""The eviction planner: alone over a fake tier of plain items, and in MemoryTier against a full scan (exact victim order)."""

import heapq
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcellar.cache import EVICTION_POLICIES, CacheEntry, Priority
from kvcellar.cache.eviction import EvictionPlanner
from kvcellar.cache.policy import LRU, PriorityLRU
from kvcellar.tiers.memory import MemoryTier

from .fakes import ROOT as NAMESPACE
from .fakes import make_entry

ROOT = b"r" * 32


def _key(name: str) -> bytes:
    return name.encode().ljust(32, b"-")


@dataclass(eq=False)
class Item:
    key: bytes
    parent: bytes
    num_bytes: int
    priority: Priority
    last_used: int
    num_pins: int = 0


class FakeTier:
    """Items by key; children by parent; `offer` after every change, as a tier does."""

    def __init__(self, policy) -> None:
        self.items: dict[bytes, Item] = {}
        self.children: dict[bytes, set[bytes]] = {}
        self.planner = EvictionPlanner(policy, self)
        self.clock = 0

    def evictable(self, key):
        item = self.items.get(key)
        return item if item is not None and item.num_pins == 0 else None

    def child_keys(self, key):
        return self.children.get(key, frozenset())

    def eviction_items(self):
        return self.items.values()

    def add(self, name: str, priority: Priority = Priority.USER, parent: str | None = None, num_bytes: int = 10) -> Item:
        self.clock += 1
        item = Item(_key(name), _key(parent) if parent else ROOT, num_bytes, priority, self.clock)
        self.items[item.key] = item
        self.children.setdefault(item.parent, set()).add(item.key)
        self.planner.offer(item)
        return item

    def touch(self, name: str) -> None:
        self.clock += 1
        item = self.items[_key(name)]
        item.last_used = self.clock
        self.planner.offer(item)

    def remove(self, item: Item) -> None:
        del self.items[item.key]
        siblings = self.children[item.parent]
        siblings.discard(item.key)
        if not siblings:
            del self.children[item.parent]
            if item.parent in self.items:
                self.planner.offer(self.items[item.parent])


def _names(items) -> list[str]:
    return [item.key.rstrip(b"-").decode() for item in items]


def test_policy_order_among_leaves() -> None:
    tier = FakeTier(PriorityLRU())
    for name, priority in [("s1", Priority.SYSTEM), ("u1", Priority.USER), ("a1", Priority.ASSISTANT),
                           ("a2", Priority.ASSISTANT), ("u2", Priority.USER)]:  # fmt: skip
        tier.add(name, priority)
    tier.touch("a1")
    assert _names(tier.planner.plan(50, None)) == ["a2", "a1", "u1", "u2", "s1"]
    lru = FakeTier(LRU())
    for name in ["b", "a", "c"]:
        lru.add(name)
    assert _names(lru.planner.plan(30, None)) == ["b", "a", "c"]


def _chain_beside_a_leaf() -> FakeTier:
    tier = FakeTier(PriorityLRU())
    tier.add("p", Priority.ASSISTANT)
    tier.add("c", Priority.SYSTEM, parent="p")
    tier.add("g", Priority.SYSTEM, parent="c")
    tier.add("x", Priority.USER)
    return tier


def test_a_chain_is_cut_from_its_end_and_the_protected_item_stays() -> None:
    assert _names(_chain_beside_a_leaf().planner.plan(40, None)) == ["x", "g", "c", "p"]
    tier = _chain_beside_a_leaf()
    assert tier.planner.plan(40, _key("x")) is None
    assert _names(tier.planner.plan(30, _key("x"))) == ["g", "c", "p"]  # the failed plan changed nothing


def test_pinned_and_stale_items_are_skipped_and_a_failed_plan_changes_nothing() -> None:
    tier = FakeTier(PriorityLRU())
    first, second = tier.add("first"), tier.add("second")
    first.num_pins = 1
    tier.touch("second")  # its old heap item is stale now
    assert tier.planner.plan(20, None) is None
    assert _names(tier.planner.plan(10, None)) == ["second"]
    first.num_pins = 0
    tier.planner.offer(first)
    tier.remove(second)
    assert _names(tier.planner.plan(10, None)) == ["first"]


def test_rebuild_keeps_one_heap_item_per_candidate_and_the_same_order() -> None:
    tier = FakeTier(LRU())
    for i in range(6):
        tier.add(f"e{i}")
    for _ in range(3):
        for i in (0, 2, 4):
            tier.touch(f"e{i}")
    tier.planner.rebuild()
    assert len(tier.planner._heap) == 6
    assert _names(tier.planner.plan(60, None)) == ["e1", "e3", "e5", "e0", "e2", "e4"]


def _full_scan_plan(tier: MemoryTier, num_bytes_needed: int, protected: bytes | None) -> list[CacheEntry] | None:
    """The order the planner must give, by definition: repeatedly the smallest (sort key, key) among the
    unpinned leaves, a parent joining once its last child is chosen (what MemoryTier computed by a scan)."""
    if num_bytes_needed <= 0:
        return []
    entries = tier.entries()
    sort_key = tier._planner.policy.sort_key
    num_children = {}
    for entry in entries:
        num_children[entry.parent] = num_children.get(entry.parent, 0) + 1
    by_key = {entry.key: entry for entry in entries}
    heap = [(sort_key(e), e.key, e) for e in entries if e.num_pins == 0 and e.key not in num_children and e.key != protected]
    heapq.heapify(heap)
    victims, num_freed = [], 0
    while num_freed < num_bytes_needed:
        if not heap:
            return None
        victim = heapq.heappop(heap)[2]
        victims.append(victim)
        num_freed += victim.num_bytes
        num_children[victim.parent] -= 1
        parent = by_key.get(victim.parent)
        if num_children[victim.parent] == 0 and parent is not None and parent.num_pins == 0 and parent.key != protected:
            heapq.heappush(heap, (sort_key(parent), parent.key, parent))
    return victims


stores = st.tuples(st.just("store"), st.integers(0, 30), st.integers(0, 40), st.sampled_from(list(Priority)), st.integers(1, 20))
tier_ops = st.one_of(
    stores,
    stores,
    stores,
    st.tuples(st.just("touch"), st.integers(0, 40)),
    st.tuples(st.just("pin"), st.integers(0, 40)),
    st.tuples(st.just("unpin")),
    st.tuples(st.just("evict"), st.integers(0, 40)),
    st.tuples(st.just("budget"), st.integers(0, 80)),
)


@settings(max_examples=300, deadline=None)
@given(policy=st.sampled_from(sorted(EVICTION_POLICIES)), steps=st.lists(tier_ops, min_size=10, max_size=60))
def test_memory_tier_evicts_in_exactly_the_full_scan_order(policy, steps) -> None:
    tier = MemoryTier(60, policy=policy)
    pinned: list[CacheEntry] = []  # loads not completed yet

    def pick(index: int) -> CacheEntry | None:
        entries = tier.entries()
        return entries[index % len(entries)] if entries else None

    for step in steps:
        if step[0] == "store":
            _, name, parent_index, priority, num_bytes = step
            parent = pick(parent_index) if parent_index % 3 else None  # a third of the stores start a chain
            entry = make_entry(f"e{name}", num_bytes, priority, parent.key if parent is not None else NAMESPACE)
            expected = _full_scan_plan(tier, tier.num_bytes + num_bytes - tier.budget_bytes, entry.parent)
            result = tier.prepare_store(entry)
            if result.accepted and result.reason != "already stored":
                assert list(result.evicted) == expected
                tier.complete_store(entry.key)
        elif step[0] == "touch" and (entry := pick(step[1])) is not None:
            tier.touch([entry.key])
        elif step[0] == "pin" and (entry := pick(step[1])) is not None:
            tier.prepare_load([entry.key])
            pinned.append(entry)
        elif step[0] == "unpin" and pinned:
            entry = pinned.pop(0)
            if tier.get(entry.key) is entry:  # not evicted explicitly (and stored again) meanwhile
                tier.complete_load([entry.key])
        elif step[0] == "evict" and (entry := pick(step[1])) is not None:
            tier.evict(entry.key)
        elif step[0] == "budget":
            expected = _full_scan_plan(tier, tier.num_bytes - step[1], None)
            if expected is None:
                with pytest.raises(ValueError):
                    tier.set_budget(step[1])
            else:
                assert list(tier.set_budget(step[1])) == expected
