"""Rows, percentiles, speedups and checks from fake samples (no model, milliseconds)."""

from __future__ import annotations

import pytest

from kvcellar.bench.summary import check_consistency, percentile, summarise


def sample(label: str, kind: str, ttft: float, prompt: int, cached: int, tiers: dict | None = None) -> dict:
    return {"label": label, "kind": kind, "num_prompt_tokens": prompt, "num_cached_tokens": cached, "ttft_s": ttft,
            "total_s": ttft + 0.01, "lookup_s": 0.001, "restore_s": 0.002, "prefill_s": ttft - 0.003,
            "num_prefill_tokens": prompt - cached, "cached_tokens_by_tier": tiers or {}}  # fmt: skip


PHASES = [
    {"mode": "no-cache", "samples": [sample("cold@2K", "cold", t, 2048, 0) for t in (1.0, 2.0, 3.0, 4.0)]},
    {"mode": "kvcellar", "samples": [sample("cold@2K", "cold", 1.1, 2048, 0),
                                     sample("exact@2K", "exact", 0.1, 2048, 2048, {"device": 2048}),
                                     sample("exact@2K", "exact", 0.3, 2048, 2048, {"disk": 2048})]},
    {"mode": "disk-only", "skipped": "this engine has no disk tier", "samples": []},
]  # fmt: skip


def test_percentile_interpolates():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 90) == pytest.approx(3.7)
    assert percentile([5.0], 99) == 5.0


def test_rows_speedups_and_tiers():
    rows = {(r["label"], r["mode"]): r for r in summarise(PHASES, "no-cache")}
    assert set(rows) == {("cold@2K", "no-cache"), ("cold@2K", "kvcellar"), ("exact@2K", "kvcellar")}
    base = rows[("cold@2K", "no-cache")]
    assert base["ttft_p50_s"] == 2.5 and base["speedup"] == 1.0 and base["hit_rate"] == 0.0
    exact = rows[("exact@2K", "kvcellar")]  # no no-cache exact row: compared with no-cache cold@2K
    assert exact["ttft_p50_s"] == pytest.approx(0.2) and exact["speedup"] == pytest.approx(12.5)
    assert exact["hit_rate"] == 1.0 and exact["hit_rate_by_tier"] == {"device": 0.5, "disk": 0.5}
    assert exact["num_saved_tokens"] == 4096 and exact["num_requests"] == 2


def test_checks_catch_broken_figures():
    assert check_consistency(PHASES, 256) == []
    bad = [{"mode": "no-cache", "samples": [sample("cold@2K", "cold", 1.0, 2048, 5, {"device": 5})]},
           {"mode": "kvcellar", "samples": [sample("exact@2K", "exact", 0.1, 2048, 1792, {"device": 1000})]}]
    problems = check_consistency(bad, 256)
    assert any("no reuse possible" in p for p in problems)
    assert any("exact repeat restored 1792 of 2048" in p for p in problems)
    assert any("do not add up" in p for p in problems)


def test_a_nearest_prefix_may_fall_back_to_a_whole_chunk():
    nearest = sample("nearest@2K", "nearest", 0.5, 2048, 1024, {"device": 1024})  # diverged at 1920
    assert any("expected at least 1792" in p for p in check_consistency([{"mode": "kvcellar", "samples": [nearest]}], 256))
    chunked = {"mode": "kvcellar", "samples": [nearest], "info": {"prefill_chunk_size": 1024}}
    assert check_consistency([chunked], 256) == []
    short = {**chunked, "samples": [sample("nearest@2K", "nearest", 0.5, 2048, 768, {"device": 768})]}
    assert any("expected at least 1024" in p for p in check_consistency([short], 256))


def test_a_peer_server_is_not_asked_for_a_breakdown_by_tier():
    """llama.cpp's llama-server reports cached tokens but no tiers; a kvcellar server must still add up."""
    hit = sample("exact@2K", "exact", 0.04, 2048, 2047)
    peer = {"mode": "http", "samples": [hit], "info": {"model": {"id": "x.gguf", "owned_by": "llamacpp"}}}
    ours = {"mode": "http", "samples": [hit], "info": {"model": {"id": "x", "owned_by": "kvcellar"}}}
    assert check_consistency([peer], 256) == []
    assert any("do not add up" in p for p in check_consistency([ours], 256))
