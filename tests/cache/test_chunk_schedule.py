"""Exact reuse when the prefill runs chunks longer than a block (B = 4, chunks of 8): `ChunkedExactReuse`.

An n-token prompt is prefilled in chunks of 8 up to n // 8 * 8, then one block at a time
("stepped" blocks, keyed apart). Exact reuse restores only where that schedule passes.
"""

import pytest

from kvcellar.cache import LayoutCapabilities, PrefixCache, Priority, hash_blocks
from kvcellar.cache.reuse import EXACT, NEAR, ChunkedExactReuse, full_chunks_end, reuse_rule

from .fakes import ATTENTION, B, RECURRENT, ROOT, SMALL_WINDOW, make_cache, payload, restored_tokens

CHUNK = 2 * B
CHUNKED = ChunkedExactReuse(block_size=B, chunk_size=CHUNK)
T = list(range(1, 41))


def _chunked_cache() -> PrefixCache:
    return make_cache(ATTENTION, reuse=CHUNKED)


def _near_view(cache: PrefixCache) -> PrefixCache:
    """A near-reuse core over the same tier and root (as a registry's cores share tiers)."""
    return PrefixCache(cache.root, cache.capabilities, cache.tiers, reuse=NEAR)


def _insert_prompt(cache: PrefixCache, tokens: list[int], with_logits: bool = False) -> None:
    """Store the prompt's full blocks (and its tail) as the engine does after an exact-mode prefill."""
    keys = cache.block_keys(tokens)
    parent = cache.root
    for index, key in enumerate(keys):
        block = tokens[index * B : (index + 1) * B]
        assert cache.insert_block(parent, block, payload(block), 10, Priority.USER, key=key) == key
        parent = key
    if with_logits:
        tail = tokens[len(keys) * B :]
        assert cache.insert_tail(parent, tail, payload(tail), 5, Priority.USER, has_logits=True) is not None


def _restored(cache: PrefixCache, tokens: list[int], planner=None) -> int:
    match = cache.lookup(tokens, planner=planner)
    assert restored_tokens(match) == tokens[: match.num_tokens]
    cache.release(match)
    return match.num_tokens


def test_the_schedule_rule() -> None:
    assert [full_chunks_end(n, CHUNK) for n in (0, 7, 8, 15, 16, 17)] == [0, 0, 8, 8, 16, 16]
    assert [p for p in range(0, 21, B) if CHUNKED.resumes_at(p, 21)] == [0, 8, 16, 20]  # 20: a stepped block's end
    assert [p for p in range(0, 24, B) if CHUNKED.resumes_at(p, 24)] == [0, 8, 16]
    assert [CHUNKED.last_boundary(k, 30, B) for k in range(0, 8)] == [0, 0, 2, 2, 4, 4, 6, 7]


def test_only_the_chunked_rule_keys_blocks_stepped() -> None:
    plain = hash_blocks(ROOT, T[:20], B)
    assert EXACT.block_keys(ROOT, T[:20], B) == NEAR.block_keys(ROOT, T[:20], B) == plain
    stepped = CHUNKED.block_keys(ROOT, T[:20], B)
    assert stepped[:4] == plain[:4] and stepped[4] != plain[4]  # [16, 20) comes after the last whole chunk


def test_stepped_blocks_are_reused_while_the_last_whole_chunk_stays() -> None:
    cache = _chunked_cache()
    _insert_prompt(cache, T[:14])  # chunk [0, 8), stepped [8, 12)
    assert _restored(cache, T[:15]) == 12


def test_crossing_a_chunk_boundary_restores_only_whole_chunks() -> None:
    cache = _chunked_cache()
    _insert_prompt(cache, T[:14])
    assert _restored(cache, T[:18]) == 8  # [8, 16) is one chunk for 18 tokens: the stepped [8, 12) differs
    _insert_prompt(cache, T[:18])  # stores [8, 12) and [12, 16) as computed in that chunk
    assert _restored(cache, T[:19]) == 16
    assert _restored(cache, T[:15]) == 12  # the stepped copy is still there for shorter prompts


def test_divergence_inside_a_whole_chunk_falls_back_to_its_start() -> None:
    cache = _chunked_cache()
    _insert_prompt(cache, T[:16])
    diverged = T[:13] + [99] + T[14:20]
    assert _restored(cache, diverged) == 8  # 12 would start a prefill inside the chunk [8, 16)
    assert _restored(_near_view(cache), diverged) == 13  # near reuse may start anywhere


def test_exact_repeat_uses_the_saved_logits() -> None:
    cache = _chunked_cache()
    _insert_prompt(cache, T[:14], with_logits=True)
    match = cache.lookup(T[:14])
    assert (match.num_tokens, match.use_logits) == (14, True)
    cache.release(match)


def test_a_planner_cut_lands_on_the_schedule() -> None:
    cache = _chunked_cache()
    _insert_prompt(cache, T[:24])
    three_segments = lambda segments, computed: 3  # noqa: E731  (load 3 blocks, recompute the rest)
    assert _restored(cache, T[:30], planner=three_segments) == 8  # 12 is inside the chunk [8, 16)
    assert _restored(_near_view(cache), T[:30], planner=three_segments) == 12


def test_the_rule_is_chosen_from_the_mode_and_the_chunk() -> None:
    assert reuse_rule(False, ATTENTION) is NEAR and reuse_rule(False, ATTENTION, CHUNK) is NEAR
    assert reuse_rule(True, ATTENTION) is EXACT and reuse_rule(True, ATTENTION, B) is EXACT
    assert reuse_rule(True, ATTENTION, CHUNK) == CHUNKED
    with pytest.raises(ValueError, match="must be a multiple of block_size"):
        reuse_rule(True, ATTENTION, 6)
    for capabilities in (RECURRENT, SMALL_WINDOW, LayoutCapabilities(block_size=B, has_recurrent=False, sliding_window=16)):
        for exact in (True, False):
            with pytest.raises(ValueError, match="needs every layer to be full attention"):
                reuse_rule(exact, capabilities, CHUNK)
    with pytest.raises(ValueError, match="with chunks of one block use ExactReuse"):
        ChunkedExactReuse(block_size=B, chunk_size=B)
