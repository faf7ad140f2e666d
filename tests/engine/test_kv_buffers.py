"""The runner's K/V buffer pool: a request reuses the last one's buffers, and their stale contents never change a result;
a request that continues the last one adopts its prompt's K/V in place, bit-identical to cold."""

from __future__ import annotations

import pytest
import torch

from kvcellar import CacheConfig, Engine
from kvcellar.engine.request import GenerationRequest
from kvcellar.kv.buffer_pool import PoolMisuseError

from .support import cancel_during_pass

ARCHS = ("qwen3", "gemma3", "qwen3_5")
BLOCK = 16


def _poison(engine: Engine) -> None:
    """Overwrite every pooled buffer with NaN: any stale row that is read turns the logits into NaN.

    Also forgets the resident keys: the buffers no longer hold what they vouch for.
    """
    pool = engine._worker.runner.kv_buffers
    with torch.inference_mode():  # the runner made them as inference tensors
        for buffer in pool._free.values():
            buffer.fill_(float("nan"))
    pool._resident = ()


def _prefill_logits(engine: Engine, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():  # as in a request: the pooled (inference) buffers may be lent
        return engine._worker.runner.prefill_prompt(GenerationRequest(engine.prepare(prompt_ids=ids)))[1]


@pytest.fixture(scope="module")
def engines(tiny_model_dirs):
    warm = {arch: Engine.load(str(tiny_model_dirs[arch]), block_size=BLOCK, cache=CacheConfig(exact=True)) for arch in ARCHS}
    cold = {arch: Engine.load(str(tiny_model_dirs[arch]), block_size=BLOCK, cache=CacheConfig(enabled=False)) for arch in ARCHS}
    yield warm, cold
    for engine in (*warm.values(), *cold.values()):
        engine.close()


def _ids(seed: int, n: int) -> list[int]:
    return [(seed * 131 + i * 17) % 500 + 10 for i in range(n)]


@pytest.mark.parametrize("arch", ARCHS)
def test_a_request_reuses_the_last_requests_buffers(engines, arch):
    _, cold = engines
    runner = cold[arch]._worker.runner
    cold[arch].generate(prompt_ids=_ids(1, 70), max_tokens=3)
    held = runner.kv_buffers.num_bytes
    assert held > 0
    reused = runner.kv_buffers.num_reused
    cold[arch].generate(prompt_ids=_ids(2, 50), max_tokens=3)
    assert runner.kv_buffers.num_reused > reused
    assert runner.kv_buffers.num_bytes == held  # the same buffers came back: one request's worth


@pytest.mark.parametrize("arch", ARCHS)
def test_stale_buffers_do_not_change_cold_logits(engines, arch):
    _, cold = engines
    engine = cold[arch]
    engine.generate(prompt_ids=_ids(3, 90), max_tokens=2)  # longer than the prompt below: stale rows past its end
    _poison(engine)
    reused = engine._worker.runner.kv_buffers.num_reused
    pooled = _prefill_logits(engine, _ids(4, 40))
    assert engine._worker.runner.kv_buffers.num_reused > reused
    fresh = _prefill_logits(engine, _ids(4, 40))  # the pool is empty now: fresh buffers
    assert torch.equal(pooled, fresh) and not torch.isnan(pooled).any()


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_hit_into_stale_buffers_is_bit_identical_to_cold(engines, arch):
    warm, cold = engines
    prompt = _ids(5, 3 * BLOCK + 5)
    warm[arch].generate(prompt_ids=prompt, max_tokens=2)
    warm[arch].generate(prompt_ids=_ids(6, 100), max_tokens=2)  # pooled buffers now hold another prompt's K/V
    turn = prompt + _ids(7, 9)  # the next turn: restore 3 blocks into the stale buffers, prefill the rest
    _poison(warm[arch])
    warm_logits = _prefill_logits(warm[arch], turn)
    assert torch.equal(warm_logits, _prefill_logits(cold[arch], turn))
    warm[arch].generate(prompt_ids=_ids(8, 100), max_tokens=2)  # the prefill above kept its buffers: refill the pool
    _poison(warm[arch])
    reused = warm[arch]._worker.runner.kv_buffers.num_reused
    warm_out, cold_out = warm[arch].generate(prompt_ids=turn, max_tokens=5), cold[arch].generate(prompt_ids=turn, max_tokens=5)
    assert warm_out.num_cached_tokens >= 3 * BLOCK and warm[arch]._worker.runner.kv_buffers.num_reused > reused
    assert warm_out.token_ids == cold_out.token_ids


def _run(engine: Engine, ids: list[int], max_tokens: int = 4):
    return engine.generate(prompt_ids=ids, max_tokens=max_tokens)


@pytest.mark.parametrize("arch", ARCHS)
def test_next_turn_adopts_the_last_prompts_kv_in_place_bit_identically(engines, arch):
    warm, cold = engines
    prompt = _ids(11, 4 * BLOCK + 3)
    first = _run(warm[arch], prompt)
    assert first.timings.num_resident_tokens == 0
    turn = prompt + list(first.token_ids) + _ids(12, 21)  # a chat's next turn: the last prompt, the answer, more
    warm_out, cold_out = _run(warm[arch], turn, 6), _run(cold[arch], turn, 6)
    assert warm_out.num_cached_tokens >= 4 * BLOCK
    assert warm_out.timings.num_resident_tokens == 4 * BLOCK  # the last prompt's full blocks, none of the answer's
    assert warm_out.token_ids == cold_out.token_ids
    _run(warm[arch], prompt)  # the pool now vouches for `prompt`'s blocks again
    with torch.inference_mode():
        restored, warm_logits = warm[arch]._worker.runner.prefill_prompt(GenerationRequest(warm[arch].prepare(prompt_ids=turn)))
    assert restored.num_resident_tokens == 4 * BLOCK
    assert torch.equal(warm_logits, _prefill_logits(cold[arch], turn))


@pytest.mark.parametrize("arch", ARCHS)
def test_another_prompt_in_between_restores_by_copy(engines, arch):
    warm, _ = engines
    prompt = _ids(13, 3 * BLOCK)
    _run(warm[arch], prompt)
    _run(warm[arch], _ids(14, 2 * BLOCK))  # the buffers now hold this one
    again = _run(warm[arch], prompt + _ids(15, 20))  # 20: the row-invariant schedule computes >= 16 tokens
    assert again.num_cached_tokens == 3 * BLOCK and again.timings.num_resident_tokens == 0


def test_resident_kv_is_not_shared_across_cache_salts(engines):
    warm, _ = engines
    prompt = _ids(16, 3 * BLOCK)
    warm["qwen3"].generate(prompt_ids=prompt, max_tokens=2, cache_salt="tenant-a")
    other = warm["qwen3"].generate(prompt_ids=prompt + _ids(17, 4), max_tokens=2, cache_salt="tenant-b")
    assert other.num_cached_tokens == 0 and other.timings.num_resident_tokens == 0


def test_a_cancelled_prefill_leaves_no_resident_kv(engines, monkeypatch):
    warm, _ = engines
    engine = warm["qwen3"]
    runner = engine._worker.runner
    streams: list = []
    cancel_during_pass(monkeypatch, streams)  # the scheduler stops the request after its first pass
    length = engine.config.prefill_chunk_size + 2 * BLOCK  # two passes at least
    streams.append(engine.stream(prompt_ids=_ids(18, length), max_tokens=2))
    result = [event.result for event in streams[0] if event.result is not None][0]
    assert result.finish_reason == "cancelled" and 0 < result.timings.num_prefill_tokens < length
    assert runner.kv_buffers._resident == ()


def test_a_pool_misuse_fails_loudly_and_keeps_the_cached_entry(engines, monkeypatch):
    # Were the pool's error a RuntimeError, restore would take it for a payload that does not fit
    # and discard a valid entry; a bug in the pool's use must surface instead.
    warm, _ = engines
    engine = warm["qwen3"]
    prefix, pool = engine.prefix_cache, engine._worker.runner.kv_buffers
    prompt = _ids(19, 3 * BLOCK)
    _run(engine, prompt)
    pool.clear()  # nothing is resident any more, but the restore is told otherwise
    monkeypatch.setattr(prefix, "_resident_tokens", lambda match, capacity, pool: match.num_tokens)
    with torch.inference_mode(), pytest.raises(PoolMisuseError, match="no resident buffer"):
        prefix.restore(prompt, prefix.block_keys(prompt), capacity=4 * BLOCK, pool=pool)
    monkeypatch.undo()
    assert engine.probe(prompt_ids=prompt).num_cached_tokens == 3 * BLOCK


def test_buffers_adopted_and_not_given_back_are_not_vouched_for_again(engines):
    """A prefill that adopted the resident buffers and ended without giving them back (as `prefill_prompt`
    alone does) leaves the pool empty: the next hit copies instead of resuming buffers that are gone."""
    warm, cold = engines
    engine = warm["qwen3"]
    prompt = _ids(21, 3 * BLOCK)
    _run(engine, prompt)  # given back: its 3 blocks are resident
    turn = prompt + _ids(22, 20)
    _prefill_logits(engine, turn)  # adopts them in place, keeps them
    again = _run(engine, turn + _ids(23, 20))
    assert again.num_cached_tokens == 4 * BLOCK and again.timings.num_resident_tokens == 0
    assert again.token_ids == _run(cold["qwen3"], turn + _ids(23, 20)).token_ids
