"""The engine's cache controls: stats report, probe, clear, budgets."""

from __future__ import annotations

import pytest

from kvcellar import CacheConfig, Engine


@pytest.fixture
def engine(tiny_model_dirs):
    engine = Engine.load(str(tiny_model_dirs["qwen3"]), block_size=16, cache=CacheConfig(device_cache_bytes=1 << 20))
    yield engine
    engine.close()


PROMPT = "a prefix cache keeps the state of prompts it has seen " * 4


def test_probe_reports_without_running_the_model(engine):
    ids = engine.encode(PROMPT)[0]
    assert engine.probe(prompt_ids=ids).num_cached_tokens == 0
    engine.generate(prompt_ids=ids, max_tokens=2)
    probe = engine.probe(prompt_ids=ids)
    assert probe.num_prompt_tokens == len(ids)
    assert probe.num_cached_tokens == len(ids) and probe.tokens_by_tier == {"device": len(ids)}
    assert engine.probe(prompt_ids=ids, cache_salt="tenant-b").num_cached_tokens == 0  # salts isolate


def test_stats_clear_and_budget(engine):
    ids = engine.encode(PROMPT)[0]
    engine.generate(prompt_ids=ids, max_tokens=2)
    engine.generate(prompt_ids=ids, max_tokens=2)
    stats = engine.cache_stats()
    assert stats["enabled"] and stats["saved_tokens"] == len(ids)
    assert stats["hit_tokens"] + stats["miss_tokens"] == 2 * len(ids)
    assert stats["tiers"]["device"]["budget_bytes"] == 1 << 20
    assert 0 < stats["tiers"]["device"]["bytes"] <= 1 << 20
    engine.set_cache_budget("device", 0)
    assert engine.cache_stats()["tiers"]["device"]["bytes"] == 0
    assert engine.cache_stats()["evictions"] > 0
    engine.set_cache_budget("device", 1 << 20)
    engine.generate(prompt_ids=ids, max_tokens=2)
    engine.clear_cache("device")
    assert engine.cache_stats()["entries"] == 0
    with pytest.raises(ValueError, match="unknown cache tier 'ssd'"):
        engine.clear_cache("ssd")


def test_the_engine_is_a_serving_engine_and_its_report_is_typed(engine):
    from kvcellar.cache.report import CacheReport
    from kvcellar.engine.serving import ServingEngine

    assert isinstance(engine, ServingEngine)  # what the server and ChatSession are typed against
    assert engine.config.block_size == 16 and engine.config.prefill_chunk_size is not None  # as resolved
    ids = engine.encode(PROMPT)[0]
    engine.generate(prompt_ids=ids, max_tokens=2)
    engine.generate(prompt_ids=ids, max_tokens=2)
    report = engine.cache_report()
    assert isinstance(report, CacheReport)
    assert (report.num_lookups, report.num_hit_tokens, report.num_tenants) == (2, len(ids), 1)
    assert report.hit_rate == len(ids) / (2 * len(ids)) and report.num_entries == report.tiers["device"].num_entries
    assert engine.cache_stats() == report.as_json()
    tenant = engine.cache_report(lambda salt: salt == "nobody")
    assert (tenant.num_lookups, tenant.num_evictions, tenant.num_tenants) == (0, None, None)
    assert {"evictions", "discards", "tenants"}.isdisjoint(tenant.as_json())


def test_default_block_size_is_the_loaded_devices(tiny_model_dirs):
    from kvcellar.config import DEFAULT_BLOCK_SIZE

    with Engine.load(str(tiny_model_dirs["qwen3"]), device="cpu", cache=CacheConfig(enabled=False)) as engine:
        assert engine.config.block_size == DEFAULT_BLOCK_SIZE["cpu"]
