import pytest

from kvcellar.cache import EVICTION_POLICIES, LRU, Priority, PriorityLRU, make_policy

from .fakes import make_entry


def _ordered(policy, entries):
    return [e.payload for e in sorted(entries, key=policy.sort_key)]


def _entries():
    specs = [("s-old", Priority.SYSTEM, 1), ("u-new", Priority.USER, 5), ("a-new", Priority.ASSISTANT, 6),
             ("a-old", Priority.ASSISTANT, 2), ("u-old", Priority.USER, 3)]  # fmt: skip
    entries = []
    for name, priority, last_used in specs:
        entry = make_entry(name, priority=priority)
        entry.last_used = last_used
        entries.append(entry)
    return entries


def test_priority_lru_orders_by_priority_then_recency() -> None:
    assert _ordered(PriorityLRU(), _entries()) == ["a-old", "a-new", "u-old", "u-new", "s-old"]


def test_lru_ignores_priority() -> None:
    assert _ordered(LRU(), _entries()) == ["s-old", "a-old", "u-old", "u-new", "a-new"]


def test_policy_table() -> None:
    assert set(EVICTION_POLICIES) == {"priority-lru", "lru"}
    assert isinstance(make_policy("lru"), LRU)
    assert make_policy("priority-lru").name == "priority-lru"
    with pytest.raises(ValueError, match="choose one of: lru, priority-lru"):
        make_policy("lfu")
