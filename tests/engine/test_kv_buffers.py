"""The runner's K/V buffer pool: a request reuses the last one's buffers, and their stale contents never change a result."""

from __future__ import annotations

import pytest
import torch

from kvcellar import CacheConfig, Engine
from kvcellar.engine.request import GenerationRequest

ARCHS = ("qwen3", "gemma3", "qwen3_5")
BLOCK = 16


def _poison(engine: Engine) -> None:
    """Overwrite every pooled buffer with NaN: any stale row that is read turns the logits into NaN."""
    with torch.inference_mode():  # the runner made them as inference tensors
        for buffer in engine._worker.runner.kv_buffers._free:
            buffer.fill_(float("nan"))


def _prefill_logits(engine: Engine, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():  # as in a request: the pooled (inference) buffers may be lent
        return engine._worker.runner.prefill_prompt(GenerationRequest(tuple(ids)))[1]


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
