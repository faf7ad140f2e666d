"""Lookup rules of PrefixCache (B = 4; prompts are small integer lists)."""

import pytest

from kvcellar.cache import LayoutCapabilities, Match, PrefixCache, Priority
from kvcellar.cache.reuse import EXACT, NEAR, ReuseRule

from .fakes import ATTENTION, B, RECURRENT, SMALL_WINDOW, insert_chain, make_cache, payload, restored_tokens

T = list(range(1, 13))  # three blocks: [1..4] [5..8] [9..12]


def _shape(match: Match) -> tuple:
    """(num_tokens, number of full blocks, tokens of the tail entry, tokens used from it, use_logits)."""
    partial = match.tail.token_ids if match.tail is not None else None
    return (match.num_tokens, len(match.blocks), partial, match.num_tail_tokens, match.use_logits)


def _lookup(cache: PrefixCache, tokens: list[int]) -> tuple:
    match = cache.lookup(tokens)
    assert restored_tokens(match) == tokens[: match.num_tokens]  # never a wrong prefix
    assert match.num_tokens < len(tokens) or match.use_logits  # one token left, unless logits
    cache.release(match)
    assert all(entry.num_pins == 0 for entry in match.entries)
    return _shape(match)


def _cache_with(
    capabilities: LayoutCapabilities, num_blocks: int, *partials: tuple[int, list[int], bool], reuse: ReuseRule = NEAR
) -> PrefixCache:
    """Blocks of T, then tail entries (parent block index or -1 for root, tokens, has_logits)."""
    cache = make_cache(capabilities, reuse=reuse)
    keys = insert_chain(cache, T[: num_blocks * B])
    for parent_index, tokens, has_logits in partials:
        parent = cache.root if parent_index < 0 else keys[parent_index]
        assert cache.insert_tail(parent, tokens, payload(tokens), 5, Priority.USER, has_logits) is not None
    return cache


def test_miss_on_empty_cache() -> None:
    cache = make_cache()
    match = cache.lookup(T)
    assert not match.is_hit and match.entries == () and match.tokens_by_tier == {}
    assert cache.lookup([]).num_tokens == 0
    cache.insert_tail(cache.root, [], "logits", 1, Priority.USER, has_logits=True)
    empty = cache.lookup([])
    assert empty.num_tokens == 0 and empty.entries == () and not empty.use_logits  # an empty prompt is a miss


def test_block_aligned_exact_repeat() -> None:
    # p == n without logits: trim to n - 1 where allowed, else fall back one block.
    assert _lookup(_cache_with(ATTENTION, 2), T[:8]) == (7, 1, (5, 6, 7, 8), 3, False)
    assert _lookup(_cache_with(ATTENTION, 2, reuse=EXACT), T[:8]) == (4, 1, None, 0, False)
    assert _lookup(_cache_with(RECURRENT, 2), T[:8]) == (4, 1, None, 0, False)
    assert _lookup(_cache_with(SMALL_WINDOW, 2), T[:8]) == (4, 1, None, 0, False)


def test_block_aligned_repeat_with_logits_needs_no_compute() -> None:
    for capabilities in (ATTENTION, RECURRENT):
        for reuse in (NEAR, EXACT):
            cache = _cache_with(capabilities, 2, (1, [], True), reuse=reuse)  # 0-token partial: logits after block 1
            assert _lookup(cache, T[:8]) == (8, 2, (), 0, True)


def test_repeat_with_tail() -> None:
    tail = (1, [9, 10], False)
    assert _lookup(_cache_with(ATTENTION, 2, tail), T[:10]) == (9, 2, (9, 10), 1, False)
    assert _lookup(_cache_with(RECURRENT, 2, tail), T[:10]) == (8, 2, None, 0, False)
    assert _lookup(_cache_with(ATTENTION, 2, tail, reuse=EXACT), T[:10]) == (8, 2, None, 0, False)
    with_logits = (1, [9, 10], True)
    assert _lookup(_cache_with(RECURRENT, 2, with_logits), T[:10]) == (10, 2, (9, 10), 2, True)
    assert _lookup(_cache_with(ATTENTION, 2, with_logits, reuse=EXACT), T[:10]) == (10, 2, (9, 10), 2, True)


def test_tail_hit_on_an_extended_prompt() -> None:
    tail = (1, [9, 10], False)
    prompt = [*T[:10], 50, 51, 52]
    assert _lookup(_cache_with(ATTENTION, 2, tail), prompt) == (10, 2, (9, 10), 2, False)
    assert _lookup(_cache_with(RECURRENT, 2, tail), prompt) == (10, 2, (9, 10), 2, False)  # checkpoint at its end
    assert _lookup(_cache_with(ATTENTION, 2, tail, reuse=EXACT), prompt) == (8, 2, None, 0, False)
    assert _lookup(_cache_with(RECURRENT, 0, (-1, [1, 2], False)), [1, 2, 3]) == (2, 0, (1, 2), 2, False)


def test_shorter_prefix_of_a_cached_chain() -> None:
    assert _lookup(_cache_with(ATTENTION, 3), T[:6]) == (5, 1, (5, 6, 7, 8), 1, False)  # trimmed to n - 1
    assert _lookup(_cache_with(ATTENTION, 3), T[:5]) == (4, 1, None, 0, False)
    assert _lookup(_cache_with(RECURRENT, 3), T[:6]) == (4, 1, None, 0, False)
    assert _lookup(_cache_with(ATTENTION, 3), [*T[:6], 99]) == (6, 1, (5, 6, 7, 8), 2, False)


def test_diverging_inside_a_block() -> None:
    prompt = [*T[:6], 77, 78, 79]
    assert _lookup(_cache_with(ATTENTION, 2), prompt) == (6, 1, (5, 6, 7, 8), 2, False)
    assert _lookup(_cache_with(ATTENTION, 2, reuse=EXACT), prompt) == (4, 1, None, 0, False)
    assert _lookup(_cache_with(RECURRENT, 2), prompt) == (4, 1, None, 0, False)
    assert _lookup(_cache_with(SMALL_WINDOW, 2), prompt) == (4, 1, None, 0, False)
    assert _lookup(_cache_with(ATTENTION, 2), [1, 2, 70, 71]) == (2, 0, (1, 2, 3, 4), 2, False)


def test_longer_cached_entry_is_trimmed_to_the_prompt() -> None:
    assert _lookup(_cache_with(ATTENTION, 3), T[:10]) == (9, 2, (9, 10, 11, 12), 1, False)
    longer_tail = (1, [9, 10, 11], False)
    assert _lookup(_cache_with(ATTENTION, 2, longer_tail), [*T[:10], 42]) == (10, 2, (9, 10, 11), 2, False)
    assert _lookup(_cache_with(RECURRENT, 2, longer_tail), [*T[:10], 42]) == (8, 2, None, 0, False)


def test_recurrent_falls_back_to_a_checkpoint_inside_the_last_block() -> None:
    # Prompt ends on a block boundary without logits: the partial [5, 6] under block 0 is the best checkpoint.
    assert _lookup(_cache_with(RECURRENT, 2, (0, [5, 6], False)), T[:8]) == (6, 1, (5, 6), 2, False)
    assert _lookup(_cache_with(RECURRENT, 2, (0, [5, 6], False), reuse=EXACT), T[:8]) == (4, 1, None, 0, False)


def test_full_partial_match_is_preferred_over_an_equal_trim() -> None:
    cache = _cache_with(ATTENTION, 3, (1, [9, 10], False))
    assert _lookup(cache, [*T[:10], 0]) == (10, 2, (9, 10), 2, False)


def test_lookup_pins_until_release_and_reports_tiers() -> None:
    cache = _cache_with(ATTENTION, 2, (1, [9], False))
    match = cache.lookup([*T[:9], 0])
    assert match.tokens_by_tier == {"device": 9}
    assert [entry.num_pins for entry in match.entries] == [1, 1, 1]
    cache.release(match)
    assert [entry.num_pins for entry in match.entries] == [0, 0, 0]
    with pytest.raises(ValueError, match="not pinned"):
        cache.release(match)


def test_block_size_mismatch_raises() -> None:
    cache = make_cache()
    with pytest.raises(ValueError, match="exactly 4 tokens"):
        cache.insert_block(cache.root, [1, 2, 3], "x", 1, Priority.USER)
    with pytest.raises(ValueError, match="fewer than 4"):
        cache.insert_tail(cache.root, [1, 2, 3, 4], "x", 1, Priority.USER)
    with pytest.raises(ValueError, match="has_logits"):
        cache.insert_tail(cache.root, [], "x", 1, Priority.USER)
    with pytest.raises(ValueError, match="at least one tier"):
        PrefixCache(cache.root, ATTENTION, [])
