"""What a result reports about its own request: prompt tokens computed when cancelled, time queued,
and the priority its system prompt's blocks are cached at when the caller sends token ids."""

from __future__ import annotations

import math

import pytest

from kvcellar import CacheConfig, Engine
from kvcellar.engine.request import StreamEvent

from .support import cancel_during_pass

BLOCK = 16
SYSTEM = "You are a careful assistant. " * 12


@pytest.fixture(scope="module")
def engine(tiny_model_dirs):
    # Exact mode: one block per prefill chunk and no message-boundary checkpoints, so the entries are countable.
    # The fixed schedule: one block per pass, so a cancel between passes is easy to place.
    loaded = Engine.load(str(tiny_model_dirs["qwen3"]), block_size=BLOCK, cache=CacheConfig(exact=True),
                         prefill_schedule="fixed")  # fmt: skip
    yield loaded
    loaded.close()


def _messages(user: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def test_a_prefill_cancelled_between_chunks_reports_the_tokens_it_computed(engine, monkeypatch):
    ids = [(i * 37) % 400 + 20 for i in range(100)]  # 100 tokens: chunks end at 16, 32, ..., 96, 100
    streams: list = []
    calls = cancel_during_pass(monkeypatch, streams, 3)  # one pass per step: seen before the fourth
    streams.append(engine.stream(prompt_ids=ids, max_tokens=4))
    events: list[StreamEvent] = list(streams[0])
    result = events[-1].result
    assert calls == [(0, BLOCK), (BLOCK, 2 * BLOCK), (2 * BLOCK, 3 * BLOCK)]
    assert result.finish_reason == "cancelled" and result.token_ids == ()
    assert result.num_cached_tokens == 0
    assert result.timings.num_prefill_tokens == 3 * BLOCK
    assert result.timings.queue_s >= 0 and len(events) == 1


def test_a_request_cancelled_while_queued_computed_nothing(engine):
    first = engine.stream("a first prompt that holds the worker " * 4, max_tokens=30, ignore_eos=True)
    queued = engine.stream("a queued prompt", max_tokens=5)
    queued.cancel()
    result = [e.result for e in queued if e.result][0]
    assert result.finish_reason == "cancelled"
    assert (result.num_cached_tokens, result.timings.num_prefill_tokens, result.token_ids) == (0, 0, ())
    assert result.timings.queue_s > 0
    assert list(first)[-1].result.finish_reason == "length"


def _expected_by_priority(num_tokens: int, system_end: int, user_end: int) -> dict[str, int]:
    """Each full block at the highest segment it touches; the prompt's tail entry ends in the assistant's
    generation prompt (after the last user message): assistant priority."""
    counts = {"SYSTEM": 0, "USER": 0, "ASSISTANT": 1}
    for start in range(0, num_tokens // BLOCK * BLOCK, BLOCK):
        counts["SYSTEM" if start < system_end else "USER" if start < user_end else "ASSISTANT"] += 1
    return counts


def test_token_ids_with_their_segments_cache_the_system_prompt_at_system_priority(engine):
    engine.clear_cache()
    ids, segments = engine.encode(messages=_messages("first question, with a few words " * 8))
    assert segments.system_end is not None and len(ids) > segments.system_end + 2 * BLOCK
    engine.generate(prompt_ids=ids, segments=segments, max_tokens=1)
    by_priority = {name: usage["entries"] for name, usage in engine.cache_stats()["by_priority"].items()}
    expected = _expected_by_priority(len(ids), segments.system_end, segments.last_user_end)
    assert by_priority == expected
    assert expected["SYSTEM"] == math.ceil(segments.system_end / BLOCK) and expected["USER"] >= 2


def test_token_ids_without_segments_are_all_user_priority(engine):
    engine.clear_cache()
    ids, _ = engine.encode(messages=_messages("second question, with other words"))
    engine.generate(prompt_ids=ids, max_tokens=1)
    by_priority = engine.cache_stats()["by_priority"]
    # A plain prompt (no segments) is "what the user sent", tail included.
    assert {name: usage["entries"] for name, usage in by_priority.items()} == {
        "SYSTEM": 0, "USER": len(ids) // BLOCK + 1, "ASSISTANT": 0}


def test_segments_need_token_ids(engine):
    _, segments = engine.encode(messages=_messages("x"))
    with pytest.raises(ValueError, match="segments= goes with prompt_ids="):
        engine.stream("text", segments=segments)
