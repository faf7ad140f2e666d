"""Prefix-cache benchmark: time to first token cold vs. cached, chunking overhead, peak memory.

Run:  PYTHONPATH=src .venv/bin/python bench/prefix_cache.py [--model DIR] [--lengths 2048,8192] \
          [--block-size 256] [--out bench-out/prefix_cache.json]

Without --model it builds (once) the random-weight Qwen3-0.6B-shape folder
`<$KVCELLAR_HOME or ~/.cache/kvcellar>/models/bench-qwen3-0.6b`. Prompts are seeded
random token ids (no tokenizer cost); each request asks for 1 token; torch uses 2
threads. For each prompt length L, three fresh subprocesses (so peaks don't mix). Each
first sends a warm-up request of L other tokens (a process's first long request pays
one-time allocator and page-fault costs; its TTFT is reported as "process's first request"),
and the unchunked forward below also follows a warm-up forward of other tokens.

- cold: engine with `CacheConfig(enabled=False)` sends 2 other prompts and P (block-aligned chunked
  prefill, the engine's normal path). Then on the bare model: unchunked forwards of the
  same 3 prompts (chunking overhead = median chunked prefill_s / median unchunked - 1), and 64 new tokens on
  top of that L-token KV, 3 times (the floor for a multi-turn extension).
- exact / nonexact: engine with the cache on (exact=True / False, 8 GiB device tier)
  sends P (insert: cold + capture), P again 3 times (exact-repeat hit: TTFT and its
  lookup / restore / prefill split), then P + 64 new tokens 3 times with different new
  tokens (multi-turn hit; ratios to the floor and to 64 / cold tok/s). Medians reported.
  Each of these follows a request that shared P, so its K/V buffers still hold P's blocks
  and the hit adopts them in place ("in place": kv/buffer_pool.py). The same two kinds of
  hit run again 3 times each right after another cached prompt ("copied": P's blocks are
  restored from the memory tier by copy, as when requests of other users interleave).

Memory (Linux): RSS after load (weights paged in, no forward yet); per-request peak RSS
(high-water mark reset via /proc/self/clear_refs) and the RSS and cache bytes just before it
(the cache's larger size, before or after the request, counts). Check, for every hit and turn:
peak <= RSS after load + cache at that request + one request's KV (tokens x layers x 2 x
kv_heads x head_dim x dtype bytes), the longest request's since the K/V pool was emptied (its
reused buffers keep the pages that request wrote); the table shows the worst repeat. Second baseline (cached
modes): RSS after the warm-up request with the cache and the engine's K/V buffer pool emptied and
the heap trimmed (the runtime state of a model that has run once, which "after load" lacks);
"peak - warm budget" uses it instead. A second warm-up request (other tokens) then refills the pool.
CPU use (CPU s / wall s: 1.5-2 with the cores to ourselves; lower: shared) flags bad runs.
llama.cpp figures (same CPU, weights and token ids; /work/shared/ANCHORS.md) print alongside.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ANCHORS = {2048: {"cold_s": 32.3, "hit_s": 0.20, "extend64_s": 1.43},  # llama.cpp llama-server, cache_prompt,
           8192: {"cold_s": 253.0, "hit_s": 0.53, "extend64_s": 3.50}}  # 2 threads, same CPU (ANCHORS.md)
NEW_TOKENS, REPEATS, THREADS, MIB = 64, 3, 2, 1024**2
SPLIT = ("ttft_s", "lookup_s", "restore_s", "prefill_s", "num_cached_tokens", "num_resident_tokens")
PARTS = (("hit", "hits"), ("hit_copied", "hits_copied"), ("turn", "turns"), ("turn_copied", "turns_copied"))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_ids(n: int, seed: int, hi: int) -> list[int]:
    return random.Random(seed).choices(range(100, hi), k=n)


# -- memory and CPU use (Linux /proc; the fallback peak, ru_maxrss, cannot be reset) ----------------
def _proc_kib(field: str, path: str = "/proc/self/status") -> int | None:
    try:
        return int(re.search(rf"{field}:\s+(\d+)", Path(path).read_text()).group(1))
    except (OSError, AttributeError):
        return None


def rss_mib(peak: bool = False) -> float:
    kib = _proc_kib("VmHWM" if peak else "VmRSS")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def reset_peak() -> None:  # VmHWM := current RSS (Linux >= 4.0)
    if Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")


def malloc_trim() -> None:  # glibc only
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def counters() -> tuple[float, int, float]:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime, u.ru_minflt, time.perf_counter()


def usage_since(start: tuple[float, int, float]) -> dict:
    cpu, faults, wall = counters()
    return {"cpu_util": (cpu - start[0]) / (wall - start[2]), "minor_faults": faults - start[1]}


# -- child phases ----------------------------------------------------------------------------------
def request(engine, ids: list[int]) -> dict:
    rss_before, cache_before = rss_mib(), cache_bytes(engine)
    reset_peak()
    start = counters()
    r = engine.generate(prompt_ids=ids, max_tokens=1)
    t, peak, usage = r.timings, rss_mib(peak=True), usage_since(start)
    # The cache may grow during the request (its own blocks, a tail, generated K/V): its budget share
    # is the larger of its sizes before and after, never the size at some earlier request.
    return {"ttft_s": t.ttft_s, "lookup_s": t.lookup_s, "restore_s": t.restore_s, "prefill_s": t.prefill_s,
            "num_prefill_tokens": t.num_prefill_tokens, "num_cached_tokens": r.num_cached_tokens,
            "num_resident_tokens": t.num_resident_tokens, "num_tokens": len(ids),
            "rss_before_mib": rss_before, "cache_mib": max(cache_before, cache_bytes(engine)) / MIB,
            "peak_mib": peak, "loadavg_1m": os.getloadavg()[0], **usage}


def bare_forwards(m, prompt: list[int], news: list[list[int]], warmup: list[int], extra_prompts: list[list[int]]) -> dict:
    """Unchunked forwards of `extra_prompts` and the prompt (after one of `warmup`; median = unchunked_s),
    then each of `news` on top of the prompt's KV (the floor)."""
    import torch
    from transformers import DynamicCache

    with torch.inference_mode():
        m(input_ids=torch.tensor([warmup]), past_key_values=DynamicCache(config=m.config), use_cache=True, logits_to_keep=1)
        out = {"unchunked_runs_s": [], "extend_floor_s": []}
        for others in extra_prompts:  # more samples of the one-pass time (its noise is ~10% here)
            started = time.perf_counter()
            m(input_ids=torch.tensor([others]), past_key_values=DynamicCache(config=m.config), use_cache=True, logits_to_keep=1)
            out["unchunked_runs_s"].append(time.perf_counter() - started)
        cache, start = DynamicCache(config=m.config), counters()
        m(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        out["unchunked_runs_s"].append(time.perf_counter() - start[2])
        out.update({f"unchunked_{k}": v for k, v in usage_since(start).items()})
        out["unchunked_s"] = statistics.median(out["unchunked_runs_s"])
        log(f"  L={len(prompt)} unchunked forward {out['unchunked_runs_s']} s, CPU use {out['unchunked_cpu_util']:.2f}")
        for new in news:
            started = time.perf_counter()
            m(input_ids=torch.tensor([new]), past_key_values=cache, use_cache=True, logits_to_keep=1)
            out["extend_floor_s"].append(time.perf_counter() - started)
            cache.crop(-len(new))  # back to the prompt's length
            assert cache.get_seq_length() == len(prompt), cache.get_seq_length()
    return out


def phase(name: str, model: str, length: int, block_size: int) -> dict:
    import torch
    from kvcellar import CacheConfig, Engine

    torch.set_num_threads(THREADS)
    cache = CacheConfig(enabled=name != "cold", exact=name == "exact", device_cache_bytes=8 * 1024**3)
    engine = Engine.load(model, block_size=block_size, num_threads=THREADS, cache=cache)
    m, cfg = engine.loaded.model, engine.loaded.model.config
    # No torch compute on this thread while the engine lives: a second OpenMP team in the process (this
    # thread's besides the engine worker's) made the worker's 2K prefill 35% slower here (4.3 vs 3.2 s,
    # CPU use 1.55 vs 1.99 of 2). So the weights (mapped lazily from the safetensors file) are paged in
    # by reading one byte per page through numpy, before "RSS after load" is taken.
    for tensor in m.state_dict().values():
        tensor.detach().reshape(-1).view(torch.uint8).numpy()[::4096].sum()
    hi = min(8000, m.get_input_embeddings().num_embeddings)
    prompt, news = make_ids(length, length, hi), [make_ids(NEW_TOKENS, 1000 + i, hi) for i in range(REPEATS)]
    extra = [make_ids(length, 11 * length + i, hi) for i in range(REPEATS - 1)]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * engine.loaded.dtype.itemsize
    out = {"phase": name, "length": length, "kv_bytes_per_token": kv_per_token, "rss_load_mib": rss_mib(),
           "prefill_chunk_size": engine.config.prefill_chunk_size}
    # The pool hands the same K/V buffers to request after request, and a page a longer request wrote
    # stays resident: the "one request's KV" in RSS is the longest request's since the pool was emptied
    # (e.g. P + 64 tokens for a hit that follows the turns). Each row records it as "pool_tokens".
    longest = 0

    def send(ids: list[int]) -> dict:
        nonlocal longest
        longest = max(longest, len(ids))
        return request(engine, ids) | {"pool_tokens": longest}

    # A process's first long request pays one-time costs (the allocator growing, pages faulted in for the
    # first time): measured +1-2 s at 2K. A server pays them once, so a warm-up request of the same
    # length (other tokens; with the cache on it is cached too and counted in the cache bytes) runs first.
    log(f"  L={length} {name}: model loaded, RSS {out['rss_load_mib']:.0f} MiB; warm-up request (other tokens)")
    out["warmup"] = send(make_ids(length, 7 * length + 1, hi))
    log(f"  L={length} {name}: warm-up TTFT {out['warmup']['ttft_s']:.2f} s; measured request (cold)")
    if name != "cold":
        # A second baseline: a model that has run once holds runtime state that "RSS after load" lacks
        # (library code paged in, oneDNN/OpenMP workspaces). Measured with the cache emptied, the engine's
        # K/V buffer pool emptied and the heap trimmed; then a second warm-up (other tokens) refills the pool.
        engine.clear_cache()
        engine._worker.runner.kv_buffers.clear()
        longest = 0
        malloc_trim()
        out["rss_warm_mib"] = rss_mib()
        out["warmup2"] = send(make_ids(length, 7 * length + 3, hi))
        log(f"  L={length} {name}: RSS after a warm-up, emptied and trimmed {out['rss_warm_mib']:.0f} MiB; "
            f"second warm-up TTFT {out['warmup2']['ttft_s']:.2f} s")
    if name == "cold":  # more cold samples, other tokens: the median is the cold prefill time
        out["extra_cold"] = [send(ids) for ids in extra]
    out["first"] = first = send(prompt)
    shared = " (cores shared? timings suspect)" if first["cpu_util"] < 1.4 else ""
    log(f"  L={length} {name}: first request TTFT {first['ttft_s']:.2f} s, CPU use {first['cpu_util']:.2f} of {THREADS}"
        f"{shared}, load {first['loadavg_1m']:.1f}, {first['minor_faults']} minor faults")
    if name == "cold":
        engine.close()  # an unclosed engine can abort the process at exit (see bench/README.md)
        return out | bare_forwards(m, prompt, news, make_ids(length, 7 * length + 2, hi), extra)
    out["hits"] = [send(prompt) for _ in range(REPEATS)]
    log(f"  L={length} {name}: repeat hit TTFT {[round(h['ttft_s'], 3) for h in out['hits']]}")
    out["turns"] = [send(prompt + new) for new in news]
    log(f"  L={length} {name}: +{NEW_TOKENS} tokens TTFT {[round(h['ttft_s'], 3) for h in out['turns']]}")
    # After another cached prompt (the second warm-up's), P's blocks are restored by copy.
    other, copied_news = make_ids(length, 7 * length + 3, hi), [make_ids(NEW_TOKENS, 2000 + i, hi) for i in range(REPEATS)]
    out["hits_copied"] = [(send(other), send(prompt))[1] for _ in range(REPEATS)]
    out["turns_copied"] = [(send(other), send(prompt + new))[1] for new in copied_news]
    log(f"  L={length} {name}: after another prompt, hit TTFT {[round(h['ttft_s'], 3) for h in out['hits_copied']]}, "
        f"+{NEW_TOKENS} tokens TTFT {[round(h['ttft_s'], 3) for h in out['turns_copied']]}")
    out["cache_bytes_end"] = cache_bytes(engine)
    engine.close()
    return out


def cache_bytes(engine) -> int:  # cache_stats(): a dict now; a list of CacheStats (one per salt) before
    stats = engine.cache_stats()
    return stats["bytes"] if isinstance(stats, dict) else sum(s.num_bytes for s in stats)


def run_child(name: str, model: str, length: int, block_size: int) -> dict:
    log(f"L={length}: phase {name} (fresh process)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "phase.json"
        subprocess.run([sys.executable, __file__, "--phase", name, "--model", model, "--lengths", str(length),
                        "--block-size", str(block_size), "--phase-out", str(path)], check=True)
        return json.loads(path.read_text())


# -- parent: orchestrate, summarise, print ---------------------------------------------------------
def bench_model() -> str:
    from kvcellar.bench.runner import bench_model_dir

    return str(bench_model_dir(progress=log))


def hardware() -> dict:
    import torch
    import transformers

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "torch_threads": THREADS,
            "mem_total_kib": _proc_kib("MemTotal", "/proc/meminfo"), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def summarise(length: int, cold: dict, modes: dict[str, dict]) -> dict:
    chunked = statistics.median([r["prefill_s"] for r in (*cold.get("extra_cold", []), cold["first"])])
    floor = statistics.median(cold["extend_floor_s"])
    tok_s = length / chunked
    s = {"cold_ttft_s": statistics.median([r["ttft_s"] for r in (*cold.get("extra_cold", []), cold["first"])]),
         "cold_prefill_s": chunked, "cold_tok_s": tok_s,
         "process_first_ttft_s": cold["warmup"]["ttft_s"], "prefill_chunk_size": cold.get("prefill_chunk_size"),
         "unchunked_s": cold["unchunked_s"], "chunking_overhead": chunked / cold["unchunked_s"] - 1,
         "extend_floor_s": floor, "anchor": ANCHORS.get(length, {}), "cold_peak_mib": cold["first"]["peak_mib"],
         "cpu_util": [cold["first"]["cpu_util"], cold["unchunked_cpu_util"], *(r["first"]["cpu_util"] for r in modes.values())],
         "modes": {}}
    for mode, r in modes.items():
        s["modes"][mode] = {
            "insert_ttft_s": r["first"]["ttft_s"], "peak_insert_mib": r["first"]["peak_mib"],
            "prefill_chunk_size": r["prefill_chunk_size"],
            "rss_load_mib": r["rss_load_mib"], "rss_warm_mib": r["rss_warm_mib"],
            "memory": {part: worst_over_budget(r, r[rows]) for part, rows in PARTS},
            **{part: {k: statistics.median(x[k] for x in r[rows]) for k in SPLIT}
               for part, rows in PARTS}}
        m = s["modes"][mode]
        for kind in ("", "_copied"):
            m.update({f"hit{kind}_speedup": s["cold_ttft_s"] / m[f"hit{kind}"]["ttft_s"],
                      f"turn{kind}_vs_floor": m[f"turn{kind}"]["ttft_s"] / floor,
                      f"turn{kind}_vs_est": m[f"turn{kind}"]["ttft_s"] / (NEW_TOKENS / tok_s)})
    return s


def worst_over_budget(phase: dict, rows: list[dict]) -> dict:
    """The request whose peak RSS went furthest over load + cache (at that request) + one request's KV.

    `over_warm_budget_mib`: the same against the RSS of a model that has run once (module docstring).
    """
    def over(row: dict) -> float:
        return row["peak_mib"] - budget(row)

    def budget(row: dict) -> float:
        return phase["rss_load_mib"] + row["cache_mib"] + row["pool_tokens"] * phase["kv_bytes_per_token"] / MIB

    row = max(rows, key=over)
    warm_over = over(row) - phase["rss_warm_mib"] + phase["rss_load_mib"]
    return {"budget_mib": budget(row), "cache_mib": row["cache_mib"], "kv_tokens": row["pool_tokens"],
            "rss_before_mib": row["rss_before_mib"],
            "peak_mib": row["peak_mib"], "over_budget_mib": over(row), "over_warm_budget_mib": warm_over,
            "peak_minus_before_mib": row["peak_mib"] - row["rss_before_mib"]}


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


def md(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["", f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def split_row(L: int, mode: str, kind: str, d: dict) -> list[str]:
    return [str(L), mode, "in place" if kind == "" else "copied", f"{d['ttft_s']:.3f}", f"{d['lookup_s']:.4f}",
            f"{d['restore_s']:.3f}", f"{d['prefill_s']:.3f}", f"{d['num_cached_tokens']:.0f}", f"{d['num_resident_tokens']:.0f}"]


def tables(summary: dict[int, dict], block_size: int) -> str:
    per_mode = [(L, s, mode, m) for L, s in summary.items() for mode, m in s["modes"].items()]
    split = ["L", "mode", "K/V", "TTFT (s)", "lookup (s)", "restore (s)", "prefill (s)", "cached", "in place"]
    first = next(iter(summary.values()))
    chunks = ", ".join(f"{mode} {m['prefill_chunk_size']}" for mode, m in first["modes"].items())
    out = md(f"Cold prefill: cache off, the engine's schedule (chunks of {first['prefill_chunk_size']} on blocks of "
             f"{block_size}; with the cache: {chunks}), vs one unchunked forward",
             ["L", "cold TTFT (s)", "process's first request (s)", "tok/s", "unchunked (s)", "chunking overhead",
              "cold+capture exact / non-exact (s)",
              f"CPU use of {THREADS}: cold / unchunked / capture ×2", "cold peak RSS (MiB)", "llama.cpp cold (s)"],
             [[str(L), f"{s['cold_ttft_s']:.2f}", f"{s['process_first_ttft_s']:.2f}", f"{s['cold_tok_s']:.0f}",
               f"{s['unchunked_s']:.2f}",
               f"{s['chunking_overhead']:+.1%}", " / ".join(f"{m['insert_ttft_s']:.2f}" for m in s["modes"].values()),
               " / ".join(f"{u:.2f}" for u in s["cpu_util"]), f"{s['cold_peak_mib']:.0f}", fmt(s["anchor"].get("cold_s"), ".1f")]
              for L, s in summary.items()])
    out += md(f"Exact-repeat hit (median of {REPEATS})", [*split, "speedup vs cold", "llama.cpp (s)"],
              [[*split_row(L, mode, kind, m[f"hit{kind}"]), f"{m[f'hit{kind}_speedup']:.0f}x", fmt(s["anchor"].get("hit_s"))]
               for L, s, mode, m in per_mode for kind in ("", "_copied")])
    out += md(f"Multi-turn hit: P + {NEW_TOKENS} new tokens (median of {REPEATS}); floor = the new tokens' forward "
              f"on a warm L-token DynamicCache; est = {NEW_TOKENS} / cold tok/s",
              [*split, "floor (s)", "TTFT/floor", "TTFT/est", "llama.cpp (s)"],
              [[*split_row(L, mode, kind, m[f"turn{kind}"]), f"{s['extend_floor_s']:.3f}", f"{m[f'turn{kind}_vs_floor']:.2f}",
                f"{m[f'turn{kind}_vs_est']:.2f}", fmt(s["anchor"].get("extend64_s"))]
               for L, s, mode, m in per_mode for kind in ("", "_copied")])
    out += md("Memory (MiB; each peak isolated per request via /proc/self/clear_refs; budget = RSS after load + "
              "cache at that request + the KV of the longest request the pooled buffers held; the worst of its repeats)",
              ["L", "mode", "request", "RSS after load / after a warm-up", "cache", "KV tokens", "budget", "RSS before",
               "peak", "peak − RSS before", "peak − budget", "peak − warm budget"],
              [[str(L), mode, part.replace("_", " "), f"{m['rss_load_mib']:.0f} / {m['rss_warm_mib']:.0f}",
                f"{w['cache_mib']:.0f}", str(w["kv_tokens"]), f"{w['budget_mib']:.0f}", f"{w['rss_before_mib']:.0f}", f"{w['peak_mib']:.0f}",
                f"{w['peak_minus_before_mib']:+.0f}", f"{w['over_budget_mib']:+.0f}", f"{w['over_warm_budget_mib']:+.0f}"]
               for L, s, mode, m in per_mode for part, w in m["memory"].items()])
    return "\n".join(out).lstrip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model folder (default: build/reuse the Qwen3-0.6B-shape bench model)")
    p.add_argument("--lengths", default="2048,8192", help="comma-separated prompt lengths in tokens")
    p.add_argument("--block-size", type=int, default=256)  # the engine's CPU default
    p.add_argument("--out", default="bench-out/prefix_cache.json")
    p.add_argument("--phase", choices=("cold", "exact", "nonexact"), help=argparse.SUPPRESS)
    p.add_argument("--phase-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    if args.phase:
        Path(args.phase_out).write_text(json.dumps(phase(args.phase, args.model, lengths[0], args.block_size)))
        return
    model, started = args.model or bench_model(), time.perf_counter()
    raw = {L: {name: run_child(name, model, L, args.block_size) for name in ("cold", "exact", "nonexact")} for L in lengths}
    summary = {L: summarise(L, r["cold"], {m: r[m] for m in ("exact", "nonexact")}) for L, r in raw.items()}
    hw = hardware()
    print(f"\n## kvcellar prefix cache — {Path(model).name}, block {args.block_size}, {hw['cpu']}, "
          f"{THREADS} threads, torch {hw['torch']}, transformers {hw['transformers']}\n", flush=True)
    print(tables(summary, args.block_size), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"hardware": hw, "model": model, "block_size": args.block_size, "new_tokens": NEW_TOKENS,
                               "repeats": REPEATS, "anchors_llama_cpp": ANCHORS, "summary": summary, "raw": raw,
                               "wall_s": time.perf_counter() - started}, indent=2))
    log(f"wrote {out} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
