"""Two engines on one real redis-server, for each layer kind: what one computed, the other restores from the
shared tier, and its greedy answer and logits are bit-identical to an engine without a cache (exact mode)."""

from __future__ import annotations

import pytest

from kvcellar import CacheConfig, Engine, EngineConfig

ARCHS = ("qwen3", "gemma3", "qwen3_5")  # full attention, sliding window, recurrent hybrid
PROMPT = list(range(5, 5 + 100))  # six 16-token blocks and a tail


def engine(folder, redis_url: str | None, enabled: bool = True) -> Engine:
    cache = CacheConfig(enabled=enabled, use_disk_tier=False, exact=True, remote_cache=redis_url)
    return Engine(EngineConfig(str(folder), device="cpu", block_size=16, num_threads=1, cache=cache))


@pytest.mark.parametrize("arch", ARCHS)
def test_a_second_engine_restores_the_first_ones_prefix_bit_identically(arch, tiny_model_dirs, redis_server):
    sampling = {"max_tokens": 8, "ignore_eos": True, "temperature": 0, "logprobs": 5}
    first = engine(tiny_model_dirs[arch], redis_server.url)
    computed = first.generate(prompt_ids=PROMPT, **sampling)
    first.close()  # drains its writes to Redis
    second = engine(tiny_model_dirs[arch], redis_server.url)
    off = engine(tiny_model_dirs[arch], None, enabled=False)
    try:
        restored = second.generate(prompt_ids=PROMPT, **sampling)
        reference = off.generate(prompt_ids=PROMPT, **sampling)
    finally:
        second.close()
        off.close()
    assert computed.num_cached_tokens == 0
    assert restored.cached_tokens_by_tier.get("remote", 0) >= 96
    assert restored.token_ids == computed.token_ids == reference.token_ids
    assert [(e.logprob, e.top) for e in restored.logprobs] == [(e.logprob, e.top) for e in reference.logprobs]
