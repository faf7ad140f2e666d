"""Exact-mode lookups when the prefill runs chunks longer than a block (B = 4, chunks of 8).

An n-token prompt is prefilled in chunks of 8 up to n // 8 * 8, then one block at a time
("stepped" blocks, keyed apart). Exact mode restores only where that schedule passes.
"""

import pytest

from kvcellar.cache import LayoutCapabilities, PrefixCache, Priority
from kvcellar.cache.match import on_schedule

from .fakes import B, make_cache, payload, restored_tokens

CHUNK = 2 * B
CHUNKED = LayoutCapabilities(block_size=B, has_recurrent=False, sliding_window=None, chunk_size=CHUNK)
T = list(range(1, 41))


def _insert_prompt(cache: PrefixCache, tokens: list[int], with_logits: bool = False) -> None:
    """Store the prompt's full blocks (and its tail) as the engine does after an exact-mode prefill."""
    keys = cache.block_keys(tokens, exact=True)
    stepped_from = cache.stepped_from(len(tokens), exact=True)
    parent = cache.root
    for index, key in enumerate(keys):
        block = tokens[index * B : (index + 1) * B]
        assert cache.insert_block(parent, block, payload(block), 10, Priority.USER, stepped=index * B >= stepped_from) == key
        parent = key
    if with_logits:
        tail = tokens[len(keys) * B :]
        assert cache.insert_tail(parent, tail, payload(tail), 5, Priority.USER, has_logits=True) is not None


def _restored(cache: PrefixCache, tokens: list[int], exact: bool = True, planner=None) -> int:
    match = cache.lookup(tokens, exact=exact, planner=planner)
    assert restored_tokens(match) == tokens[: match.num_tokens]
    cache.release(match)
    return match.num_tokens


def test_the_schedule_rule() -> None:
    assert [CHUNKED.full_chunks_end(n) for n in (0, 7, 8, 15, 16, 17)] == [0, 0, 8, 8, 16, 16]
    assert [p for p in range(0, 21, B) if on_schedule(p, 21, CHUNK)] == [0, 8, 16, 20]  # 20: a stepped block's end
    assert [p for p in range(0, 24, B) if on_schedule(p, 24, CHUNK)] == [0, 8, 16]


def test_stepped_blocks_are_reused_while_the_last_whole_chunk_stays() -> None:
    cache = make_cache(CHUNKED)
    _insert_prompt(cache, T[:14])  # chunk [0, 8), stepped [8, 12)
    assert _restored(cache, T[:15]) == 12


def test_crossing_a_chunk_boundary_restores_only_whole_chunks() -> None:
    cache = make_cache(CHUNKED)
    _insert_prompt(cache, T[:14])
    assert _restored(cache, T[:18]) == 8  # [8, 16) is one chunk for 18 tokens: the stepped [8, 12) differs
    _insert_prompt(cache, T[:18])  # stores [8, 12) and [12, 16) as computed in that chunk
    assert _restored(cache, T[:19]) == 16
    assert _restored(cache, T[:15]) == 12  # the stepped copy is still there for shorter prompts


def test_divergence_inside_a_whole_chunk_falls_back_to_its_start() -> None:
    cache = make_cache(CHUNKED)
    _insert_prompt(cache, T[:16])
    diverged = T[:13] + [99] + T[14:20]
    assert _restored(cache, diverged) == 8  # 12 would start a prefill inside the chunk [8, 16)
    assert _restored(cache, diverged, exact=False) == 13  # non-exact mode may start anywhere


def test_exact_repeat_uses_the_saved_logits() -> None:
    cache = make_cache(CHUNKED)
    _insert_prompt(cache, T[:14], with_logits=True)
    match = cache.lookup(T[:14], exact=True)
    assert (match.num_tokens, match.use_logits) == (14, True)
    cache.release(match)


def test_a_planner_cut_lands_on_the_schedule() -> None:
    cache = make_cache(CHUNKED)
    _insert_prompt(cache, T[:24])
    three_segments = lambda segments, computed: 3  # noqa: E731  (load 3 blocks, recompute the rest)
    assert _restored(cache, T[:30], planner=three_segments) == 8  # 12 is inside the chunk [8, 16)
    assert _restored(cache, T[:30], exact=False, planner=three_segments) == 12


def test_capabilities_check_the_chunk_size() -> None:
    assert LayoutCapabilities(block_size=B, has_recurrent=False, sliding_window=None).chunk_size == B
    with pytest.raises(ValueError, match="chunk_size must be a multiple of block_size"):
        LayoutCapabilities(block_size=B, has_recurrent=False, sliding_window=None, chunk_size=6)
    for recurrent, window in ((True, None), (False, 16)):
        with pytest.raises(ValueError, match="needs every layer to be full attention"):
            LayoutCapabilities(block_size=B, has_recurrent=recurrent, sliding_window=window, chunk_size=CHUNK)
