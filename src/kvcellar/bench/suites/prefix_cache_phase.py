"""The child side of the prefix-cache suite: one phase (cold, exact or nonexact) at one prompt length.

Operations: `run_phase(spec) -> dict` (spec: phase, model, length,
block_size; run by `fresh_process` in a new process), `NEW_TOKENS`,
`REPEATS`, `THREADS`.

What a phase sends is described in `prefix_cache`. Two rules hold for the
whole phase, because breaking either changes what is measured:
- No torch compute on this thread while the engine lives: a second OpenMP
  team in the process (this thread's besides the engine worker's) slows the
  worker's prefills and lowers their CPU use. So the weights are paged in by
  reading one byte per page through numpy.
- Every request's peak RSS is its own: the kernel's high-water mark is reset
  before it (`hardware.reset_peak_rss`).
"""

from __future__ import annotations

import os
import statistics
import time

from kvcellar.bench.hardware import Usage, memory_report, reset_peak_rss
from kvcellar.bench.progress import log
from kvcellar.bench.scenarios import make_ids

NEW_TOKENS, REPEATS, THREADS, MIB = 64, 3, 2, 1024**2
DEVICE_CACHE_BYTES = 8 * 1024**3


def cache_bytes(engine: object) -> int:
    return engine.cache_stats()["bytes"]


def request(engine: object, ids: list[int]) -> dict:
    rss_before, cache_before = memory_report()["rss_mib"], cache_bytes(engine)
    reset_peak_rss()
    usage = Usage.start()
    r = engine.generate(prompt_ids=ids, max_tokens=1)
    t, peak, used = r.timings, memory_report()["peak_rss_mib"], usage.finish()
    # The cache may grow during the request (its own blocks, a tail, generated K/V): its budget share
    # is the larger of its sizes before and after, never the size at some earlier request.
    return {"ttft_s": t.ttft_s, "lookup_s": t.lookup_s, "restore_s": t.restore_s, "prefill_s": t.prefill_s,
            "num_prefill_tokens": t.num_prefill_tokens, "num_cached_tokens": r.num_cached_tokens,
            "num_resident_tokens": t.num_resident_tokens, "num_tokens": len(ids),
            "rss_before_mib": rss_before, "cache_mib": max(cache_before, cache_bytes(engine)) / MIB,
            "peak_mib": peak, "loadavg_1m": os.getloadavg()[0], "cpu_util": used["cpu_util"],
            "minor_faults": used["minor_faults"]}  # fmt: skip


def bare_forwards(m, prompt: list[int], news: list[list[int]], warmup: list[int], extra_prompts: list[list[int]]) -> dict:
    """Unchunked forwards of `extra_prompts` and the prompt (after one of `warmup`; median = unchunked_s),
    then each of `news` on top of the prompt's KV (the floor). Runs only after the engine is closed."""
    import torch
    from transformers import DynamicCache

    def forward(ids: list[int], cache: object) -> None:
        m(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True, logits_to_keep=1)

    with torch.inference_mode():
        forward(warmup, DynamicCache(config=m.config))
        out = {"unchunked_runs_s": [], "extend_floor_s": []}
        for others in extra_prompts:  # more samples of the one-pass time, whose noise is larger than a chunk's
            started = time.perf_counter()
            forward(others, DynamicCache(config=m.config))
            out["unchunked_runs_s"].append(time.perf_counter() - started)
        cache, usage = DynamicCache(config=m.config), Usage.start()
        forward(prompt, cache)
        used = usage.finish()
        out["unchunked_runs_s"].append(used["wall_s"])
        out.update({"unchunked_cpu_util": used["cpu_util"], "unchunked_minor_faults": used["minor_faults"]})
        out["unchunked_s"] = statistics.median(out["unchunked_runs_s"])
        log(f"  L={len(prompt)} unchunked forward {out['unchunked_runs_s']} s, CPU use {out['unchunked_cpu_util']:.2f}")
        for new in news:
            started = time.perf_counter()
            forward(new, cache)
            out["extend_floor_s"].append(time.perf_counter() - started)
            cache.crop(-len(new))  # back to the prompt's length
            assert cache.get_seq_length() == len(prompt), cache.get_seq_length()
    return out


def _page_in_weights(model: object) -> None:
    import torch

    for tensor in model.state_dict().values():
        tensor.detach().reshape(-1).view(torch.uint8).numpy()[::4096].sum()


def run_phase(spec: dict) -> dict:
    import torch

    from kvcellar import CacheConfig, Engine
    from kvcellar.engine.heap import trim_heap
    from kvcellar.engine.memory import kv_bytes_per_token

    name, length = spec["phase"], spec["length"]
    torch.set_num_threads(THREADS)
    cache = CacheConfig(enabled=name != "cold", exact=name == "exact", device_cache_bytes=DEVICE_CACHE_BYTES)
    engine = Engine.load(spec["model"], block_size=spec["block_size"], num_threads=THREADS, cache=cache)
    m = engine.loaded.model
    _page_in_weights(m)  # before "RSS after load" is taken
    hi = min(8000, m.get_input_embeddings().num_embeddings)
    prompt, news = make_ids(length, length, hi), [make_ids(NEW_TOKENS, 1000 + i, hi) for i in range(REPEATS)]
    extra = [make_ids(length, 11 * length + i, hi) for i in range(REPEATS - 1)]
    kv_per_token = kv_bytes_per_token(engine.loaded)
    out = {"phase": name, "length": length, "kv_bytes_per_token": kv_per_token, "rss_load_mib": memory_report()["rss_mib"],
           "prefill_chunk_size": engine.config.prefill_chunk_size}  # fmt: skip
    # The pool hands the same K/V buffers to request after request, and a page a longer request wrote
    # stays resident: the "one request's KV" in RSS is the longest request's since the pool was emptied
    # (e.g. P + 64 tokens for a hit that follows the turns). Each row records it as "pool_tokens".
    longest = 0

    def send(ids: list[int]) -> dict:
        nonlocal longest
        longest = max(longest, len(ids))
        return request(engine, ids) | {"pool_tokens": longest}

    # A process's first long request pays one-time costs (the allocator growing, pages faulted in for the
    # first time) that a server pays once: a warm-up request of the same length (other tokens; with the
    # cache on it is cached too and counted in the cache bytes) runs first.
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
        trim_heap()
        out["rss_warm_mib"] = memory_report()["rss_mib"]
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
        engine.close()  # an engine left open can abort the process at exit
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
