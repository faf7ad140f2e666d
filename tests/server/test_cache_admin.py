"""Probe, clear, budgets, stats windows, Prometheus metrics and the HIT / MISS log line."""

from __future__ import annotations

import re
import time

from .support import long_text
from .support import metric as _metric


def _chat(server, messages, **kwargs):
    return server.client().chat.completions.create(model=server.model, messages=messages, max_tokens=2, temperature=0, **kwargs)


def _probe(server, body) -> dict:
    response = server.post("/v1/cache/probe", body)
    assert response.status_code == 200, response.text
    return response.json()


def test_probe_tells_what_is_cached_without_running_the_model(server, unique):
    messages = [{"role": "user", "content": long_text(unique, 30)}]
    before = _probe(server, {"messages": messages})
    assert before["cached_tokens"] == 0 and before["cached_tokens_by_tier"] == {}
    requests_before = server.get("/v1/cache/stats").json()["requests"]
    reply = _chat(server, messages)
    after = _probe(server, {"messages": messages, "model": server.model})
    assert after["prompt_tokens"] == reply.usage.prompt_tokens == before["prompt_tokens"]
    assert after["prompt_tokens"] // 16 * 16 <= after["cached_tokens"] <= after["prompt_tokens"]
    assert after["cached_tokens_by_tier"] == {"device": after["cached_tokens"]}
    assert after["uncached_tokens"] == after["prompt_tokens"] - after["cached_tokens"]
    # Probes are not requests: the server counted exactly the one chat.
    assert server.get("/v1/cache/stats").json()["requests"] == requests_before + 1


def test_probe_of_a_text_prompt_and_of_token_ids(server, unique):
    prompt = long_text(unique, 30)
    server.client().completions.create(model=server.model, prompt=prompt, max_tokens=1)
    by_text = _probe(server, {"prompt": prompt})
    assert by_text["cached_tokens"] >= 16
    assert _probe(server, {"prompt": [by_text["prompt_tokens"] % 7 + 3] * 20})["prompt_tokens"] == 20


def test_clear_one_tier_then_all(server, unique):
    messages = [{"role": "user", "content": long_text(unique, 30)}]
    _chat(server, messages)
    assert _probe(server, {"messages": messages})["cached_tokens"] > 0
    response = server.post("/v1/cache/clear", {"tier": "device"})
    assert response.status_code == 200
    assert response.json()["cleared"] == ["device"]
    assert response.json()["tiers"]["device"]["bytes"] == 0
    assert _probe(server, {"messages": messages})["cached_tokens"] == 0
    _chat(server, messages)
    everything = server.post("/v1/cache/clear", {}).json()
    assert everything["cleared"] == list(server.get("/v1/cache/stats").json()["tiers"])
    assert all(tier["entries"] == 0 for tier in everything["tiers"].values())
    assert _probe(server, {"messages": messages})["cached_tokens"] == 0


def test_budget_changes_at_run_time(server, unique):
    original = server.get("/v1/cache/stats").json()["tiers"]["device"]["budget_bytes"]
    try:
        response = server.post("/v1/cache/budget", {"tier": "device", "budget": "1M"})
        assert response.status_code == 200
        assert response.json()["tiers"]["device"]["budget_bytes"] == 1024**2
        server.post("/v1/cache/budget", {"tier": "device", "budget": 0})
        messages = [{"role": "user", "content": long_text(unique, 30)}]
        _chat(server, messages)
        tiers = server.get("/v1/cache/stats").json()["tiers"]
        assert tiers["device"]["bytes"] == 0 and tiers["device"]["budget_bytes"] == 0
        assert _probe(server, {"messages": messages})["cached_tokens"] == 0
    finally:
        server.post("/v1/cache/budget", {"tier": "device", "budget": original})
    assert server.get("/v1/cache/stats").json()["tiers"]["device"]["budget_bytes"] == original


def test_stats_have_cumulative_counters_and_windows(server, unique):
    before = server.get("/v1/cache/stats").json()
    messages = [{"role": "user", "content": long_text(unique, 30)}]
    _chat(server, messages)
    second = _chat(server, messages)
    after = server.get("/v1/cache/stats", params={"history": "true"}).json()
    assert after["requests"] == before["requests"] + 2
    assert after["lookups"] >= before["lookups"] + 2
    assert after["hit_tokens"] - before["hit_tokens"] >= second.usage.prompt_tokens_details.cached_tokens > 0
    assert set(after["windows"]) == {"1m", "5m", "15m"}
    for window in after["windows"].values():
        assert window["requests"] >= 2 and 0 < window["hit_rate"] <= 1 and window["span_s"] >= 0
    assert after["history"] and {"time_s", "hit_tokens", "saved_tokens"} <= set(after["history"][0])
    assert after["model"] == server.model and after["queue_depth"] == 0
    health = server.get("/health").json()
    assert health["block_size"] > 0 and health["prefill_chunk_size"] % health["block_size"] == 0
    assert health["prefill_schedule"] in ("fixed", "row-invariant")


def test_prometheus_metrics(server, unique):
    before = server.get("/metrics").text
    messages = [{"role": "user", "content": long_text(unique, 30)}]
    _chat(server, messages)
    _chat(server, messages)
    response = server.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in ("kvcellar_cache_saved_tokens_total", "kvcellar_cache_hit_tokens_total", "kvcellar_cache_miss_tokens_total",
                 "kvcellar_cache_evictions_total", "kvcellar_queue_depth", 'kvcellar_cache_tier_bytes{tier="device"}',
                 'kvcellar_cache_tier_budget_bytes{tier="device"}', 'kvcellar_cache_tier_hit_tokens_total{tier="device"}'):
        _metric(text, name)
    assert _metric(text, "kvcellar_cache_saved_tokens_total") > _metric(before, "kvcellar_cache_saved_tokens_total")
    assert "kvcellar_ttft_seconds_bucket" in text


def test_hit_and_miss_log_lines(server, unique):
    messages = [{"role": "user", "content": long_text(unique, 30)}]
    first, second = _chat(server, messages), _chat(server, messages)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and second.id not in server.log_text():
        time.sleep(0.05)
    log = server.log_text()
    assert re.search(rf"DEBUG kvcellar.server: MISS {first.id} chat.completions: 0/", log)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert re.search(rf"DEBUG kvcellar.server: HIT {second.id} chat.completions: {cached}/", log)
