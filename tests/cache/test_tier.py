import pytest

from kvcellar.cache import Priority, Tier
from kvcellar.tiers.memory import MemoryTier

from .fakes import make_entry, store

S, U, A = Priority.SYSTEM, Priority.USER, Priority.ASSISTANT


def _names(entries) -> list[str]:
    return [e.payload for e in entries]


def _mixed_tier(policy: str) -> MemoryTier:
    tier = MemoryTier(60, policy=policy)
    for name, priority in [("s1", S), ("u1", U), ("a1", A), ("s2", S), ("u2", U), ("a2", A)]:
        store(tier, make_entry(name, 10, priority))
    tier.touch([make_entry("a1").key, make_entry("u1").key])  # a1, then u1 become the most recent
    return tier


def test_memory_tier_speaks_the_protocol() -> None:
    assert isinstance(MemoryTier(10), Tier)
    assert MemoryTier(10).name == "device"
    with pytest.raises(ValueError, match="medium"):
        MemoryTier(10, name="hot")
    with pytest.raises(ValueError, match="budget_bytes"):
        MemoryTier(-1)


def test_eviction_order_priority_then_recency() -> None:
    tier = _mixed_tier("priority-lru")
    evicted = tier.set_budget(10)
    assert _names(evicted) == ["a2", "a1", "u2", "u1", "s1"]
    assert _names(tier.entries()) == ["s2"]
    assert tier.num_bytes == 10 and tier.budget_bytes == 10


def test_eviction_order_lru() -> None:
    tier = _mixed_tier("lru")
    assert _names(tier.set_budget(10)) == ["s1", "s2", "u2", "a2", "a1"]
    assert _names(tier.entries()) == ["u1"]


def test_budget_setter_evicts_at_once() -> None:
    tier = _mixed_tier("priority-lru")
    tier.budget_bytes = 40
    assert _names(tier.entries()) == ["s1", "u1", "s2", "u2"]
    tier.budget_bytes = 0
    assert tier.num_entries == 0 and tier.num_bytes == 0
    assert not tier.prepare_store(make_entry("x", 0)).accepted  # budget 0 stores nothing


def test_only_leaves_are_evicted() -> None:
    tier = MemoryTier(30)
    parent = store(tier, make_entry("par", 10, A))  # lowest priority, oldest: but a parent
    child = store(tier, make_entry("chi", 10, S, parent=parent.key))
    other = store(tier, make_entry("oth", 10, U))
    assert tier.set_budget(20) == (other,)
    assert tier.set_budget(10) == (child,)  # the child goes first, although SYSTEM
    assert tier.set_budget(0) == (parent,)  # now a leaf


def test_parent_becomes_candidate_within_one_eviction_round() -> None:
    tier = MemoryTier(40)
    a = store(tier, make_entry("a", 10, A))
    b = store(tier, make_entry("b", 10, A, parent=a.key))
    c = store(tier, make_entry("c", 10, A, parent=b.key))
    s = store(tier, make_entry("s", 10, S))
    assert tier.set_budget(10) == (c, b, a)
    assert tier.entries() == [s]


def test_parent_of_the_incoming_entry_is_protected() -> None:
    tier = MemoryTier(20)
    parent = store(tier, make_entry("par", 10, A))
    other = store(tier, make_entry("oth", 10, S))
    result = tier.prepare_store(make_entry("chi", 10, U, parent=parent.key))
    assert result.accepted and result.evicted == (other,)
    assert tier.contains(parent.key)


def test_oversized_entry_is_refused_without_evicting() -> None:
    tier = MemoryTier(100)
    small = store(tier, make_entry("small", 60))
    result = tier.prepare_store(make_entry("huge", 101))
    assert not result.accepted and result.evicted == ()
    assert "exceeds" in result.reason and "100 bytes" in result.reason
    assert tier.entries() == [small] and tier.num_bytes == 60


def test_pinned_entries_are_not_evicted() -> None:
    tier = MemoryTier(30)
    a = store(tier, make_entry("a", 10, A))
    u = store(tier, make_entry("u", 10, U))
    store(tier, make_entry("s", 10, S))
    assert tier.prepare_load([a.key]) == [a] and a.num_pins == 1
    result = tier.prepare_store(make_entry("new", 10, S))
    assert result.evicted == (u,)
    tier.complete_store(make_entry("new", 10, S).key)
    tier.complete_load([a.key])
    assert a.num_pins == 0


def test_store_refused_when_everything_is_pinned_or_a_parent() -> None:
    tier = MemoryTier(20)
    parent = store(tier, make_entry("par", 10, A))
    child = store(tier, make_entry("chi", 10, A, parent=parent.key))
    tier.prepare_load([child.key])
    result = tier.prepare_store(make_entry("new", 10, S))
    assert not result.accepted and result.evicted == () and "pinned" in result.reason
    assert tier.num_entries == 2 and tier.num_bytes == 20


def test_two_step_store_and_abort() -> None:
    tier = MemoryTier(30)
    entry = make_entry("e", 10)
    assert tier.prepare_store(entry).accepted
    assert tier.get(entry.key) is None and not tier.contains(entry.key)  # invisible until complete
    assert tier.num_bytes == 10 and tier.num_entries == 0  # but its bytes are reserved
    tier.complete_store(entry.key)
    assert tier.get(entry.key) is entry and tier.num_entries == 1
    other = make_entry("o", 10)
    tier.prepare_store(other)
    tier.abort_store(other.key)
    assert tier.num_bytes == 10
    with pytest.raises(KeyError):
        tier.complete_store(other.key)


def test_reserved_entry_keeps_its_parent() -> None:
    tier = MemoryTier(20)
    parent = store(tier, make_entry("par", 10, A))
    tier.prepare_store(make_entry("chi", 10, S, parent=parent.key))  # in flight
    with pytest.raises(ValueError, match="retry"):
        tier.set_budget(10)
    assert tier.budget_bytes == 20 and tier.contains(parent.key)


def test_restoring_an_existing_key_touches_and_raises_priority() -> None:
    tier = MemoryTier(30)
    first = store(tier, make_entry("e", 10, A))
    other = store(tier, make_entry("o", 10, A))
    result = tier.prepare_store(make_entry("e", 10, U))
    assert result.accepted and result.evicted == ()
    tier.complete_store(first.key)  # a no-op for a resident key
    assert tier.num_bytes == 20 and tier.num_entries == 2
    assert first.priority is U and first.last_used > other.last_used
    store(tier, make_entry("e", 10, A))
    assert first.priority is U  # never lowered


def test_load_pins_and_touches_in_order() -> None:
    tier = MemoryTier(30)
    a, b = store(tier, make_entry("a")), store(tier, make_entry("b"))
    tier.prepare_load([b.key, a.key])
    assert a.last_used > b.last_used and a.num_pins == b.num_pins == 1
    tier.complete_load([a.key, b.key])
    with pytest.raises(ValueError, match="not pinned"):
        tier.complete_load([a.key])
    with pytest.raises(KeyError):
        tier.prepare_load([a.key, make_entry("zz").key])
    assert a.num_pins == 0  # nothing pinned by the failed call


def test_children_evict_and_clear() -> None:
    tier = MemoryTier(100)
    parent = store(tier, make_entry("par"))
    kids = [store(tier, make_entry(name, parent=parent.key)) for name in ("k1", "k2", "k3")]
    assert tier.children(parent.key) == kids
    assert tier.evict(kids[1].key) is kids[1]
    assert tier.children(parent.key) == [kids[0], kids[2]]
    assert tier.evict(kids[1].key) is None
    assert tier.evict(parent.key) is parent  # explicit: its children stay
    assert tier.children(parent.key) == [kids[0], kids[2]] and tier.num_bytes == 20
    tier.clear()
    assert tier.num_entries == 0 and tier.num_bytes == 0 and tier.children(parent.key) == []
