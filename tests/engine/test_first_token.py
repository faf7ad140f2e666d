"""A whole-prompt hit with stored logits streams its first token before any K/V are copied.

The order is checked, not timed: the restore is held until the consumer has the first token; a runner
that restored first would never emit it, and the held restore would give up and fail the request.
"""

from __future__ import annotations

import threading

import pytest

from kvcellar import Engine
from kvcellar.config import CacheConfig
from kvcellar.kv.adapter import ModelPrefixCache

BLOCK = 16


@pytest.fixture(scope="module")
def engine(tiny_fp32_dirs):
    with Engine.load(str(tiny_fp32_dirs["qwen3"]), block_size=BLOCK, cache=CacheConfig(exact=True, cost_model=False)) as loaded:
        yield loaded


def _prompt(seed: int) -> list[int]:
    return [(seed * 37 + i * 11) % 400 + 20 for i in range(3 * BLOCK + 5)]


def _pinned(engine: Engine) -> int:
    return sum(entry.num_pins for tier in engine.cache_registry.tiers for entry in getattr(tier, "_entries", {}).values())


def test_first_token_comes_before_the_restore(engine, monkeypatch):
    prompt = _prompt(1)
    cold = engine.generate(prompt_ids=prompt, max_tokens=5)
    first_token_seen = threading.Event()
    builds: list[bool] = []
    real_build = ModelPrefixCache._build

    def held_build(self, pending, capacity, pool):
        builds.append(first_token_seen.wait(timeout=60))  # True only if the first token reached us first
        return real_build(self, pending, capacity, pool)

    monkeypatch.setattr(ModelPrefixCache, "_build", held_build)
    tokens = []
    result = None
    for event in engine.stream(prompt_ids=prompt, max_tokens=5):
        if event.token_id is not None:
            tokens.append(event.token_id)
            first_token_seen.set()
        if event.result is not None:
            result = event.result
    assert builds == [True]  # one restore, and only after the first token was out
    assert result.num_cached_tokens == len(prompt)
    assert tuple(tokens) == result.token_ids == cold.token_ids


def test_a_one_token_answer_from_stored_logits_copies_nothing_and_holds_nothing(engine, monkeypatch):
    prompt = _prompt(2)
    cold = engine.generate(prompt_ids=prompt, max_tokens=1)
    monkeypatch.setattr(ModelPrefixCache, "_build", lambda *args: pytest.fail("restored K/V for a one-token answer"))
    warm = engine.generate(prompt_ids=prompt, max_tokens=1)
    assert warm.token_ids == cold.token_ids and warm.num_cached_tokens == len(prompt)
    assert warm.timings.restore_s == 0.0
    assert _pinned(engine) == 0  # the lookup's entries were let go


def test_every_token_is_a_stream_event_even_without_text(engine):
    """Random weights often pick tokens that decode to no text yet: each still reaches the stream."""
    events = [event for event in engine.stream(prompt_ids=_prompt(3), max_tokens=8, ignore_eos=True) if event.result is None]
    token_events = [event for event in events if event.token_id is not None]
    assert len(token_events) == 8
