"""The child side of the disk-tier suite: the processes A (write), B (restore) and the miss-only ones.

Operations: `write_phase(spec)`, `restore_phase(spec)`, `miss_phase(spec)`
(each run by `fresh_process` in a new process; spec: model, length,
block_size, dir, and for misses disk ("on" / "off") and prompts),
`drop_page_cache(files)`, `resident_fraction(files)`, `raw_read(files, buffer)`.

What each process sends is described in `disk_tier`. The engine's first
request pages the weights in through the engine's own thread and under its
own salt: torch compute on this thread would start a second OpenMP team,
which slows the engine's prefills.
"""

from __future__ import annotations

import gc
import os
import random
import subprocess
import time
from pathlib import Path

from kvcellar.bench.hardware import Usage
from kvcellar.bench.progress import log
from kvcellar.bench.scenarios import make_ids

THREADS, ROUNDS, READ_CHUNK, MB, WARMUP_TOKENS, MISS_SEED = 2, 3, 4 << 20, 1e6, 512, 10_000
MISS_LENGTHS = (1024, 2048)  # a miss prompt's length is drawn from this range


def entry_files(cache_dir: str) -> list[Path]:
    return sorted(Path(cache_dir, "entries-v1").rglob("*.safetensors"))


def drop_page_cache(files: list[Path]) -> str:
    """Evict the files' pages: global drop_caches if permitted, and posix_fadvise(DONTNEED) on each file."""
    gc.collect()  # payloads from earlier hits map the files; mapped pages cannot be dropped
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        method = "drop_caches+fadvise"
    except OSError:
        method = "fadvise"
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    return method


def resident_fraction(files: list[Path]) -> float | None:
    """Fraction of the files' bytes in the page cache (util-linux fincore), None if unavailable."""
    try:
        cmd = ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", *map(str, files)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return None
    res, size = sum(map(int, out[0::2])), sum(map(int, out[1::2]))
    return round(min(1.0, res / size), 3) if size else None  # RES counts whole pages


def raw_read(files: list[Path], buffer: bytearray) -> dict:
    view, total, started = memoryview(buffer), 0, time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as handle:
            while n := handle.readinto(view):
                total += n
    seconds = time.perf_counter() - started
    return {"bytes": total, "s": seconds, "bytes_per_s": total / seconds}


def disk_counters(engine: object) -> dict:
    disk = next((t for t in engine.cache_registry.tiers if t.name == "disk"), None)
    return dict(disk.stats().counters) if disk is not None else {}


def request(engine: object, ids: list[int]) -> dict:
    usage, before = Usage.start(), disk_counters(engine)
    r = engine.generate(prompt_ids=ids, max_tokens=1)
    used, after, t = usage.finish(), disk_counters(engine), r.timings
    delta = {k: after[k] - before[k] for k in ("num_loads", "load_bytes", "load_s")} if after else {}
    return {"tokens": len(ids), "wall_s": used["wall_s"], "ttft_s": t.ttft_s, "total_s": t.total_s, "lookup_s": t.lookup_s,
            "restore_s": t.restore_s, "prefill_s": t.prefill_s, "num_cached_tokens": r.num_cached_tokens,
            "cached_tokens_by_tier": dict(r.cached_tokens_by_tier), "cpu_util": used["cpu_util"],
            "loadavg_1m": os.getloadavg()[0], "disk": delta}  # fmt: skip


def open_engine(spec: dict, **cache: object) -> tuple[object, float, int]:
    import torch

    from kvcellar import CacheConfig, Engine

    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    engine = Engine.load(spec["model"], block_size=spec["block_size"], dtype="bfloat16", num_threads=THREADS,
                         cache=CacheConfig(**cache))  # fmt: skip
    load_s, m = time.perf_counter() - started, engine.loaded.model
    # 16 tokens: no full block, so nothing of it is cached under the measured salt.
    engine.generate(prompt_ids=list(range(100, 116)), max_tokens=1, cache_salt="bench-warm-up")
    return engine, load_s, min(8000, m.get_input_embeddings().num_embeddings)


def close_engine(engine: object) -> dict:
    started, flushed = time.perf_counter(), engine.cache_registry.flush(None)  # no timeout: wait for every write
    out = {"flush_s": time.perf_counter() - started, "flushed": flushed, "disk_end": disk_counters(engine),
           "cache_stats": engine.cache_stats(), "num_dropped_core": sum(s.num_dropped for s in engine.cache_registry.stats())}
    engine.close()
    return out


def write_phase(spec: dict) -> dict:
    """Process A: the cold request, then flush and close."""
    engine, load_s, hi = open_engine(spec, cache_dir=spec["dir"])
    cold = request(engine, make_ids(spec["length"], spec["length"], hi))
    log(f"  A: cold TTFT {cold['ttft_s']:.2f} s, CPU use {cold['cpu_util']:.2f}; flushing")
    return {"load_s": load_s, "cold": cold, **close_engine(engine)}


def restore_phase(spec: dict) -> dict:
    """Process B: rounds of cold / warm page-cache hits and raw reads of the same files."""
    usage = Usage.start()
    engine, load_s, hi = open_engine(spec, cache_dir=spec["dir"])
    prompt, files = make_ids(spec["length"], spec["length"], hi), entry_files(spec["dir"])
    out = {"load_s": load_s, "disk_open": disk_counters(engine), "num_files": len(files),
           "file_bytes": sum(p.stat().st_size for p in files), "probe": engine.probe(prompt_ids=prompt).tokens_by_tier,
           "cold": [], "warm": [], "raw_cold": [], "raw_warm": []}  # fmt: skip
    buffer = bytearray(READ_CHUNK)
    for r in range(ROUNDS):  # the device tier is cleared before every hit, so each one reads the disk tier
        for kind in ("cold", "warm", "raw_cold", "raw_warm"):
            engine.clear_cache("device")
            method = drop_page_cache(files) if kind.endswith("cold") else "none"
            before = {"resident_before": resident_fraction(files), "drop": method}
            out[kind].append(before | (raw_read(files, buffer) if kind.startswith("raw") else request(engine, prompt)))
        c, w = out["cold"][-1], out["warm"][-1]
        log(f"  B round {r}: hit TTFT cold-page {c['ttft_s']:.3f} s (resident {c['resident_before']}, {c['drop']}) / "
            f"warm {w['ttft_s']:.3f} s; raw read {out['raw_cold'][-1]['bytes_per_s'] / MB:.0f} / "
            f"{out['raw_warm'][-1]['bytes_per_s'] / MB:.0f} MB/s; tiers {c['cached_tokens_by_tier']}")
    return out | close_engine(engine) | {"cpu_util": usage.finish()["cpu_util"]}


def miss_phase(spec: dict) -> dict:
    """One process of the miss-only part: its share of the distinct prompts, with the disk tier on or off."""
    on = spec["disk"] == "on"
    engine, load_s, hi = open_engine(spec, **({"cache_dir": spec["dir"]} if on else {"use_disk_tier": False}))
    prompts = [int(i) for i in spec["prompts"].split(",")]
    request(engine, make_ids(WARMUP_TOKENS, MISS_SEED - 100 - 2 * prompts[0] - on, hi))  # uncounted warm-up
    rows = [{"prompt": i, **request(engine, make_ids(random.Random(MISS_SEED + i).randint(*MISS_LENGTHS), MISS_SEED + i, hi))}
            for i in prompts]  # fmt: skip
    log(f"  miss disk={spec['disk']} prompts {spec['prompts']}: TTFT {[round(r['ttft_s'], 2) for r in rows]}, "
        f"CPU use {[round(r['cpu_util'], 2) for r in rows]}")
    return {"load_s": load_s, "requests": rows, **close_engine(engine)}
