"""From per-request samples to table rows: percentiles, hit rates per tier, tokens saved, speedups.

Operations: `percentile(values, q)`, `summarise(phases, baseline_mode) -> rows`,
`check_consistency(phases) -> problems`.

A row is one (scenario label, mode) pair. Its speedup is the baseline mode's
TTFT p50 for the same label over its own; prefix rows that the baseline does
not run (restart@2K) compare with the baseline's cold row of that length.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from kvcellar.bench.scenarios import cold_label
from kvcellar.cache.reuse import EXACT, ChunkedExactReuse

# Modes whose exact repeats must be served whole from the cache (no cost-model choice, no tier forcing).
EXACT_HIT_MODES = ("kvcellar", "device-only")
NO_REUSE_MODES = ("no-cache", "http-no-reuse")


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")


def _row(label: str, mode: str, samples: list[dict]) -> dict:
    ttft = [s["ttft_s"] for s in samples]
    prompt = sum(s["num_prompt_tokens"] for s in samples)
    cached = sum(s["num_cached_tokens"] for s in samples)
    by_tier: dict[str, int] = defaultdict(int)
    for s in samples:
        for tier, count in s["cached_tokens_by_tier"].items():
            by_tier[tier] += count
    return {
        "label": label, "mode": mode, "kind": samples[0]["kind"], "num_requests": len(samples),
        "mean_prompt_tokens": prompt / len(samples),
        "ttft_p50_s": percentile(ttft, 50), "ttft_p90_s": percentile(ttft, 90), "ttft_p99_s": percentile(ttft, 99),
        "total_p50_s": percentile([s["total_s"] for s in samples], 50),
        "lookup_p50_s": percentile([s["lookup_s"] for s in samples], 50),
        "restore_p50_s": percentile([s["restore_s"] for s in samples], 50),
        "prefill_p50_s": percentile([s["prefill_s"] for s in samples], 50),
        "num_prompt_tokens": prompt, "num_saved_tokens": cached,
        "hit_rate": cached / prompt if prompt else 0.0,
        "hit_rate_by_tier": {tier: count / prompt for tier, count in sorted(by_tier.items())} if prompt else {},
        "speedup": None,
    }  # fmt: skip


def summarise(phases: list[dict], baseline_mode: str) -> list[dict]:
    """One row per (label, mode), in the order the labels were first sent."""
    rows = []
    for phase in phases:
        if phase.get("skipped"):
            continue
        groups: dict[str, list[dict]] = defaultdict(list)
        for sample in phase["samples"]:
            groups[sample["label"]].append(sample)
        rows += [_row(label, phase["mode"], samples) for label, samples in groups.items()]
    index = {(row["label"], row["mode"]): row for row in rows}
    for row in rows:
        base = index.get((row["label"], baseline_mode)) or index.get((cold_label(row["label"]), baseline_mode))
        if base is not None and row["ttft_p50_s"] > 0:
            row["speedup"] = base["ttft_p50_s"] / row["ttft_p50_s"]
    order = list(dict.fromkeys(row["label"] for row in rows))
    return sorted(rows, key=lambda row: order.index(row["label"]))


def check_consistency(phases: list[dict], block_size: int) -> list[str]:
    """What the figures must satisfy whatever the hardware; each broken rule is one line."""
    problems = []
    for phase in phases:
        if phase.get("skipped"):
            continue
        mode = phase["mode"]
        info = phase.get("info") or {}
        chunk = info.get("prefill_chunk_size") or (info.get("health") or {}).get("prefill_chunk_size") or block_size
        served = info.get("model")
        # A peer server (llama.cpp, vLLM) reports cached tokens but no breakdown by tier.
        by_tier = not (isinstance(served, dict) and served.get("owned_by") not in (None, "kvcellar"))
        for s in phase["samples"]:
            where = f"{mode} {s['label']}"
            if s["num_cached_tokens"] > s["num_prompt_tokens"]:
                problems.append(f"{where}: {s['num_cached_tokens']} cached of {s['num_prompt_tokens']} prompt tokens")
            if by_tier and sum(s["cached_tokens_by_tier"].values()) != s["num_cached_tokens"]:
                problems.append(f"{where}: cached tokens by tier {s['cached_tokens_by_tier']} do not add up to "
                                f"{s['num_cached_tokens']}")  # fmt: skip
            if mode in NO_REUSE_MODES and s["num_cached_tokens"] != 0:
                problems.append(f"{where}: {s['num_cached_tokens']} tokens cached with no reuse possible")
            if mode in EXACT_HIT_MODES and s["kind"] == "exact" and s["num_cached_tokens"] != s["num_prompt_tokens"]:
                problems.append(f"{where}: exact repeat restored {s['num_cached_tokens']} of {s['num_prompt_tokens']}")
            if mode in EXACT_HIT_MODES and s["kind"] == "nearest":
                # It diverges inside its last block: every block before it is cached, and exact mode restores
                # the last boundary of those where the prompt's prefill schedule passes (a whole chunk's end).
                n = s["num_prompt_tokens"]
                rule = ChunkedExactReuse(block_size, chunk) if chunk > block_size else EXACT
                least = rule.last_boundary(n // block_size - 1, n, block_size) * block_size
                if s["num_cached_tokens"] < least:
                    problems.append(f"{where}: nearest prefix restored {s['num_cached_tokens']}, expected at least {least}")
            if s["ttft_s"] <= 0 or s["total_s"] < s["ttft_s"]:
                problems.append(f"{where}: TTFT {s['ttft_s']:.4f} s, total {s['total_s']:.4f} s")
    return problems
