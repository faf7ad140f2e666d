"""The eviction planner alone, over a fake tier of plain items: exact victim order."""

from dataclasses import dataclass

from kvcellar.cache import Priority
from kvcellar.cache.eviction import EvictionPlanner
from kvcellar.cache.policy import LRU, PriorityLRU

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
