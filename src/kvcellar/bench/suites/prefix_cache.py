"""Prefix-cache suite: time to first token cold vs cached, chunking overhead, peak memory, on CPU.

Operations: `PrefixCacheConfig`, `run(config) -> dict` (prints the tables,
writes the JSON), `summarise(length, cold, modes)`, `tables(summary, block_size)`.

Prompts are seeded random token ids (no tokenizer cost); each request asks
for 1 token; torch uses 2 threads. For each prompt length L, three fresh
processes (so peaks don't mix; `prefix_cache_phase`). Each first sends a
warm-up request of L other tokens (a process's first long request pays
one-time allocator and page-fault costs; its TTFT is reported as "process's
first request"), and the unchunked forward below also follows a warm-up
forward of other tokens.

- cold: engine with `CacheConfig(enabled=False)` sends 2 other prompts and P
  (block-aligned chunked prefill, the engine's normal path). Then on the bare
  model: unchunked forwards of the same 3 prompts (chunking overhead = median
  chunked prefill_s / median unchunked - 1), and 64 new tokens on top of that
  L-token KV, 3 times (the floor for a multi-turn extension).
- exact / nonexact: engine with the cache on (exact=True / False, 8 GiB
  device tier) sends P (insert: cold + capture), P again 3 times
  (exact-repeat hit: TTFT and its lookup / restore / prefill split), then
  P + 64 new tokens 3 times with different new tokens (multi-turn hit; ratios
  to the floor and to 64 / cold tok/s). Medians reported. Each of these
  follows a request that shared P, so its K/V buffers still hold P's blocks
  and the hit adopts them in place ("in place": kv/buffer_pool.py). The same
  two kinds of hit run again 3 times each right after another cached prompt
  ("copied": P's blocks are restored from the memory tier by copy, as when
  requests of other users interleave).

Memory (Linux): RSS after load (weights paged in, no forward yet);
per-request peak RSS and the RSS and cache bytes just before it (the cache's
larger size, before or after the request, counts). Check, for every hit and
turn: peak <= RSS after load + cache at that request + one request's KV
(tokens x layers x 2 x kv_heads x head_dim x dtype bytes), the longest
request's since the K/V pool was emptied (its reused buffers keep the pages
that request wrote); the table shows the worst repeat. Second baseline:
RSS after the warm-up request with the cache and the engine's K/V buffer pool
emptied and the heap trimmed (the runtime state of a model that has run once,
which "after load" lacks); "peak - warm budget" uses it instead.
CPU use (CPU s / wall s: near the thread count with the cores to ourselves;
much lower: shared) flags runs whose timings are not valid. llama.cpp's
figures on the same CPU, weights and token ids (`ANCHORS`) print alongside.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from kvcellar.bench.hardware import hardware
from kvcellar.bench.progress import log
from kvcellar.bench.report import section
from kvcellar.bench.suites.fresh_process import run_in_fresh_process
from kvcellar.bench.suites.prefix_cache_phase import MIB, NEW_TOKENS, REPEATS, THREADS, run_phase

# llama.cpp's llama-server with cache_prompt, 2 threads, on the CPU these token ids were first run on
# (/work/shared/ANCHORS.md); a reference printed beside kvcellar's figures, not measured here.
ANCHORS = {2048: {"cold_s": 32.3, "hit_s": 0.20, "extend64_s": 1.43},
           8192: {"cold_s": 253.0, "hit_s": 0.53, "extend64_s": 3.50}}  # fmt: skip
SPLIT = ("ttft_s", "lookup_s", "restore_s", "prefill_s", "num_cached_tokens", "num_resident_tokens")
PARTS = (("hit", "hits"), ("hit_copied", "hits_copied"), ("turn", "turns"), ("turn_copied", "turns_copied"))
PHASES = ("cold", "exact", "nonexact")


@dataclass(frozen=True, slots=True)
class PrefixCacheConfig:
    """`model` None: the bench's Qwen3-0.6B-shape folder (made once). Block 256 is the engine's CPU default."""

    model: str | None = None
    lengths: tuple[int, ...] = (2048, 8192)
    block_size: int = 256
    out: str = "bench-out/prefix_cache.json"

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"--block-size must be >= 1 (got {self.block_size})")
        if not self.lengths or any(n < self.block_size for n in self.lengths):
            raise ValueError(f"--lengths must list prompt lengths of at least one block ({self.block_size} tokens), "
                             f"e.g. 2048,8192 (got {self.lengths!r})")  # fmt: skip


def summarise(length: int, cold: dict, modes: dict[str, dict]) -> dict:
    samples = (*cold.get("extra_cold", []), cold["first"])
    chunked = statistics.median([r["prefill_s"] for r in samples])
    floor = statistics.median(cold["extend_floor_s"])
    tok_s = length / chunked
    s = {"cold_ttft_s": statistics.median([r["ttft_s"] for r in samples]),
         "cold_prefill_s": chunked, "cold_tok_s": tok_s,
         "process_first_ttft_s": cold["warmup"]["ttft_s"], "prefill_chunk_size": cold.get("prefill_chunk_size"),
         "unchunked_s": cold["unchunked_s"], "chunking_overhead": chunked / cold["unchunked_s"] - 1,
         "extend_floor_s": floor, "anchor": ANCHORS.get(length, {}), "cold_peak_mib": cold["first"]["peak_mib"],
         "cpu_util": [cold["first"]["cpu_util"], cold["unchunked_cpu_util"], *(r["first"]["cpu_util"] for r in modes.values())],
         "modes": {}}  # fmt: skip
    for mode, r in modes.items():
        s["modes"][mode] = {
            "insert_ttft_s": r["first"]["ttft_s"], "peak_insert_mib": r["first"]["peak_mib"],
            "prefill_chunk_size": r["prefill_chunk_size"],
            "rss_load_mib": r["rss_load_mib"], "rss_warm_mib": r["rss_warm_mib"],
            "memory": {part: worst_over_budget(r, r[rows]) for part, rows in PARTS},
            **{part: {k: statistics.median(x[k] for x in r[rows]) for k in SPLIT} for part, rows in PARTS}}  # fmt: skip
        m = s["modes"][mode]
        for kind in ("", "_copied"):
            m.update({f"hit{kind}_speedup": s["cold_ttft_s"] / m[f"hit{kind}"]["ttft_s"],
                      f"turn{kind}_vs_floor": m[f"turn{kind}"]["ttft_s"] / floor,
                      f"turn{kind}_vs_est": m[f"turn{kind}"]["ttft_s"] / (NEW_TOKENS / tok_s)})  # fmt: skip
    return s


def worst_over_budget(phase: dict, rows: list[dict]) -> dict:
    """The request whose peak RSS went furthest over load + cache (at that request) + one request's KV.

    `over_warm_budget_mib`: the same against the RSS of a model that has run once (module docstring).
    """

    def budget(row: dict) -> float:
        return phase["rss_load_mib"] + row["cache_mib"] + row["pool_tokens"] * phase["kv_bytes_per_token"] / MIB

    def over(row: dict) -> float:
        return row["peak_mib"] - budget(row)

    row = max(rows, key=over)
    warm_over = over(row) - phase["rss_warm_mib"] + phase["rss_load_mib"]
    return {"budget_mib": budget(row), "cache_mib": row["cache_mib"], "kv_tokens": row["pool_tokens"],
            "rss_before_mib": row["rss_before_mib"],
            "peak_mib": row["peak_mib"], "over_budget_mib": over(row), "over_warm_budget_mib": warm_over,
            "peak_minus_before_mib": row["peak_mib"] - row["rss_before_mib"]}  # fmt: skip


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


def _split_row(length: int, mode: str, kind: str, d: dict) -> list[str]:
    return [str(length), mode, "in place" if kind == "" else "copied", f"{d['ttft_s']:.3f}", f"{d['lookup_s']:.4f}",
            f"{d['restore_s']:.3f}", f"{d['prefill_s']:.3f}", f"{d['num_cached_tokens']:.0f}",
            f"{d['num_resident_tokens']:.0f}"]  # fmt: skip


def tables(summary: dict[int, dict], block_size: int) -> str:
    per_mode = [(L, s, mode, m) for L, s in summary.items() for mode, m in s["modes"].items()]
    split = ["L", "mode", "K/V", "TTFT (s)", "lookup (s)", "restore (s)", "prefill (s)", "cached", "in place"]
    first = next(iter(summary.values()))
    chunks = ", ".join(f"{mode} {m['prefill_chunk_size']}" for mode, m in first["modes"].items())
    out = section(f"Cold prefill: cache off, the engine's schedule (chunks of {first['prefill_chunk_size']} on blocks of "
                  f"{block_size}; with the cache: {chunks}), vs one unchunked forward",
                  ["L", "cold TTFT (s)", "process's first request (s)", "tok/s", "unchunked (s)", "chunking overhead",
                   "cold+capture exact / non-exact (s)",
                   f"CPU use of {THREADS}: cold / unchunked / capture ×2", "cold peak RSS (MiB)", "llama.cpp cold (s)"],
                  [[str(L), f"{s['cold_ttft_s']:.2f}", f"{s['process_first_ttft_s']:.2f}", f"{s['cold_tok_s']:.0f}",
                    f"{s['unchunked_s']:.2f}", f"{s['chunking_overhead']:+.1%}",
                    " / ".join(f"{m['insert_ttft_s']:.2f}" for m in s["modes"].values()),
                    " / ".join(f"{u:.2f}" for u in s["cpu_util"]), f"{s['cold_peak_mib']:.0f}",
                    _fmt(s["anchor"].get("cold_s"), ".1f")]
                   for L, s in summary.items()])  # fmt: skip
    out += section(f"Exact-repeat hit (median of {REPEATS})", [*split, "speedup vs cold", "llama.cpp (s)"],
                   [[*_split_row(L, mode, kind, m[f"hit{kind}"]), f"{m[f'hit{kind}_speedup']:.0f}x",
                     _fmt(s["anchor"].get("hit_s"))]
                    for L, s, mode, m in per_mode for kind in ("", "_copied")])  # fmt: skip
    out += section(f"Multi-turn hit: P + {NEW_TOKENS} new tokens (median of {REPEATS}); floor = the new tokens' forward "
                   f"on a warm L-token DynamicCache; est = {NEW_TOKENS} / cold tok/s",
                   [*split, "floor (s)", "TTFT/floor", "TTFT/est", "llama.cpp (s)"],
                   [[*_split_row(L, mode, kind, m[f"turn{kind}"]), f"{s['extend_floor_s']:.3f}",
                     f"{m[f'turn{kind}_vs_floor']:.2f}", f"{m[f'turn{kind}_vs_est']:.2f}", _fmt(s["anchor"].get("extend64_s"))]
                    for L, s, mode, m in per_mode for kind in ("", "_copied")])  # fmt: skip
    out += section("Memory (MiB; each peak isolated per request via /proc/self/clear_refs; budget = RSS after load + "
                   "cache at that request + the KV of the longest request the pooled buffers held; the worst of its repeats)",
                   ["L", "mode", "request", "RSS after load / after a warm-up", "cache", "KV tokens", "budget", "RSS before",
                    "peak", "peak − RSS before", "peak − budget", "peak − warm budget"],
                   [[str(L), mode, part.replace("_", " "), f"{m['rss_load_mib']:.0f} / {m['rss_warm_mib']:.0f}",
                     f"{w['cache_mib']:.0f}", str(w["kv_tokens"]), f"{w['budget_mib']:.0f}", f"{w['rss_before_mib']:.0f}",
                     f"{w['peak_mib']:.0f}", f"{w['peak_minus_before_mib']:+.0f}", f"{w['over_budget_mib']:+.0f}",
                     f"{w['over_warm_budget_mib']:+.0f}"]
                    for L, s, mode, m in per_mode for part, w in m["memory"].items()])  # fmt: skip
    return "\n".join(out).lstrip()


def run(config: PrefixCacheConfig) -> dict:
    from kvcellar.bench.runner import bench_model_dir

    started = time.perf_counter()
    model = config.model or str(bench_model_dir(progress=log))
    raw = {}
    for length in config.lengths:
        raw[length] = {}
        for name in PHASES:
            log(f"L={length}: phase {name} (fresh process)")
            spec = {"phase": name, "model": model, "length": length, "block_size": config.block_size}
            raw[length][name] = run_in_fresh_process(run_phase, spec)
    summary = {L: summarise(L, r["cold"], {m: r[m] for m in ("exact", "nonexact")}) for L, r in raw.items()}
    hw = hardware("cpu")
    print(f"\n## kvcellar prefix cache — {Path(model).name}, block {config.block_size}, {hw['cpu']}, "
          f"{THREADS} threads, torch {hw['torch']}, transformers {hw['transformers']}\n", flush=True)
    print(tables(summary, config.block_size), flush=True)
    result = {"hardware": hw, "model": model, "block_size": config.block_size, "new_tokens": NEW_TOKENS,
              "repeats": REPEATS, "anchors_llama_cpp": ANCHORS, "summary": summary, "raw": raw,
              "wall_s": time.perf_counter() - started}  # fmt: skip
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    log(f"wrote {out} ({result['wall_s']:.0f} s)")
    return result
