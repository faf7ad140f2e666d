"""The count-bounded LRU of partial entries, driven through PrefixCache."""

from kvcellar.cache import PrefixCache, Priority

from .fakes import RecordingObserver, insert_chain, make_cache, payload


def _insert(cache: PrefixCache, tokens: list[int], has_logits: bool = False, parent=None):
    parent = cache.root if parent is None else parent
    return cache.insert_tail(parent, tokens, payload(tokens), 5, Priority.USER, has_logits)


def _resident_partials(cache: PrefixCache) -> list[tuple[int, ...]]:
    return sorted(e.token_ids for e in cache.tiers[0].entries() if e.is_tail)


def test_siblings_under_one_parent_are_kept() -> None:
    cache = make_cache()
    (block,) = insert_chain(cache, [1, 2, 3, 4])
    for tokens in ([5], [5, 6], [7], []):
        assert _insert(cache, tokens, has_logits=not tokens, parent=block) is not None
    assert _resident_partials(cache) == [(), (5,), (5, 6), (7,)]
    assert cache.stats().num_partial_entries == 4


def test_count_bound_evicts_the_least_recently_used_partial() -> None:
    observer = RecordingObserver()
    cache = make_cache(max_tail_entries=2, observer=observer)
    for token in (1, 2, 3):
        _insert(cache, [token])
    assert _resident_partials(cache) == [(2,), (3,)]
    assert ("evict", (1,), "device") in observer.events
    assert cache.stats().num_evictions == 1


def test_lookup_promotes_a_partial() -> None:
    cache = make_cache(max_tail_entries=2)
    _insert(cache, [1])
    _insert(cache, [2])
    match = cache.lookup([1, 9])
    assert match.tail is not None and match.tail.token_ids == (1,)
    cache.release(match)
    _insert(cache, [3])
    assert _resident_partials(cache) == [(1,), (3,)]


def test_reinsert_promotes_without_counting_twice() -> None:
    cache = make_cache(max_tail_entries=2)
    _insert(cache, [1])
    _insert(cache, [2])
    _insert(cache, [1])
    assert cache.stats().num_bytes == 10
    _insert(cache, [3])
    assert _resident_partials(cache) == [(1,), (3,)]


def test_pinned_partials_are_skipped_or_the_insert_is_refused() -> None:
    observer = RecordingObserver()
    cache = make_cache(max_tail_entries=2, observer=observer)
    _insert(cache, [1])
    _insert(cache, [2])
    held = cache.lookup([1, 9])  # pins [1]
    _insert(cache, [2])  # promotes [2]: the pinned [1] is now the least recent
    _insert(cache, [3])  # skips the pinned [1]
    assert _resident_partials(cache) == [(1,), (3,)]
    cache.release(held)

    single = make_cache(max_tail_entries=1, observer=observer)
    _insert(single, [1])
    held = single.lookup([1, 9])
    assert _insert(single, [2]) is None
    assert observer.events[-1] == ("refuse", (2,), "max_partial_entries=1 reached and every tail is pinned")
    single.release(held)
    assert _insert(single, [2]) is not None
    assert _resident_partials(single) == [(2,)]


def test_zero_disables_partials() -> None:
    observer = RecordingObserver()
    cache = make_cache(max_tail_entries=0, observer=observer)
    assert _insert(cache, [1]) is None
    assert observer.events == [("refuse", (1,), "tails disabled")]
    assert cache.stats().num_entries == 0


def test_a_tail_with_logits_replaces_the_same_tail_without() -> None:
    cache = make_cache()
    key = _insert(cache, [1, 2])
    assert _insert(cache, [1, 2], has_logits=True) == key
    entry = cache.tiers[0].get(key)
    assert entry is not None and entry.has_logits
    assert cache.stats().num_entries == 1 and cache.stats().num_bytes == 5 and cache.stats().num_evictions == 0
    assert _insert(cache, [1, 2]) == key and cache.tiers[0].get(key) is entry  # never downgraded


def test_partial_evicted_for_bytes_leaves_the_lru() -> None:
    cache = make_cache(budget_bytes=15, max_tail_entries=2)
    _insert(cache, [1])  # 5 bytes, USER
    insert_chain(cache, [5, 6, 7, 8], num_bytes=10, priority=Priority.SYSTEM)
    _insert(cache, [2])  # needs 5 bytes: evicts [1], the only lower-priority leaf
    assert _resident_partials(cache) == [(2,)]
    _insert(cache, [3])  # evicts [2] for bytes; the count never overflows
    assert _resident_partials(cache) == [(3,)]
    assert cache.stats().num_evictions == 2


def test_a_refused_tail_with_logits_keeps_the_old_tail() -> None:
    cache = make_cache(budget_bytes=10)
    key = _insert(cache, [1, 2])
    old = cache.tiers[0].get(key)
    assert cache.insert_tail(cache.root, [1, 2], "with logits", 11, Priority.USER, has_logits=True) is None
    assert cache.tiers[0].get(key) is old and not old.has_logits  # 11 bytes never fit: the old tail stays
    assert cache.stats().num_partial_entries == 1 and cache.stats().num_bytes == 5
    match = cache.lookup([1, 2, 3])
    assert match.tail is old
    cache.release(match)
