"""Disk-tier benchmark: restart hit vs cold, restore vs raw read bandwidth, miss-only p99 with the tier on/off.

Run:  PYTHONPATH=src .venv/bin/python bench/disk_tier.py [--model DIR] [--length 8192] [--block-size 256] \
          [--miss-prompts 20] [--only miss] [--out bench-out/disk_tier.json] [--work-dir DIR --keep]

Qwen3-0.6B-shape folder as in bench/prefix_cache.py (helpers imported from it), bf16, 2 threads,
seeded random token ids, 1 token per request, exact mode, each phase in a fresh process.
1. Restart hit: process A (`CacheConfig(cache_dir=D)`) sends the L-token prompt cold, flushes the
   write-behind queue (timed), closes. Process B opens D (device tier empty) and sends it again:
   TTFT, restored tokens per tier (must be all "disk"), split lookup (includes the disk read: tiers
   load inside the lookup) / restore (K/V into a DynamicCache) / prefill. "Page cache dropped" =
   `echo 3 > /proc/sys/vm/drop_caches` when permitted, plus posix_fadvise(DONTNEED) on every entry
   file (`fincore`: resident fraction before). B runs 3 rounds: dropped hit, warm hit, dropped raw
   read, warm raw read (device tier cleared before each). 2. Restore bandwidth from those rounds:
   the disk tier's counters (file bytes / s in its loads: mmap + checksum + decode) and end-to-end
   (bytes / (lookup + restore)) vs reading the same files sequentially (4 MiB readinto one buffer).
3. Miss-only: N distinct 1-2K-token prompts (all miss; blocks written through to disk behind), with
   `CacheConfig(cache_dir=D2)` (on) / `CacheConfig(use_disk_tier=False)` (off), N/4 per process in
   order on,off,off,on,on,off,off,on (drift cancels), after one uncounted 512-token request: TTFT and
   total p50/p99 (interpolated), p99 on/off, write-behind drops. CPU use = process CPU s / wall s per
   request (~1.6-1.9 of 2 on idle cores; far less means the cores were shared: rerun).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prefix_cache import bench_model, hardware, log, make_ids, md

THREADS, ROUNDS, READ_CHUNK, MB, WARMUP_TOKENS, MISS_SEED = 2, 3, 4 << 20, 1e6, 512, 10_000


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


# -- child phases -----------------------------------------------------------------------------------
def cpu_now() -> float:
    return sum(resource.getrusage(resource.RUSAGE_SELF)[:2])  # user + system seconds


def disk_counters(engine) -> dict:
    disk = next((t for t in engine.cache_registry.tiers if t.name == "disk"), None)
    return dict(disk.stats().counters) if disk is not None else {}


def request(engine, ids: list[int]) -> dict:
    cpu, before, started = cpu_now(), disk_counters(engine), time.perf_counter()
    r = engine.generate(prompt_ids=ids, max_tokens=1)
    wall, after, t = time.perf_counter() - started, disk_counters(engine), r.timings
    delta = {k: after[k] - before[k] for k in ("num_loads", "load_bytes", "load_s")} if after else {}
    return {"tokens": len(ids), "wall_s": wall, "ttft_s": t.ttft_s, "total_s": t.total_s, "lookup_s": t.lookup_s,
            "restore_s": t.restore_s, "prefill_s": t.prefill_s, "num_cached_tokens": r.num_cached_tokens,
            "cached_tokens_by_tier": dict(r.cached_tokens_by_tier), "cpu_util": (cpu_now() - cpu) / wall,
            "loadavg_1m": os.getloadavg()[0], "disk": delta}


def open_engine(a, **cache: object):
    import torch

    from kvcellar import CacheConfig, Engine

    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    engine = Engine.load(a.model, block_size=a.block_size, dtype="bfloat16", num_threads=THREADS, cache=CacheConfig(**cache))
    load_s, m = time.perf_counter() - started, engine.loaded.model
    # Pages the weights in, through the engine's own thread and under its own salt (16 tokens: no full
    # block). Torch compute on this thread would start a second OpenMP team, which slowed the engine's
    # prefills by ~35% on 2 cores (bench/prefix_cache.py).
    engine.generate(prompt_ids=list(range(100, 116)), max_tokens=1, cache_salt="bench-warm-up")
    return engine, load_s, min(8000, m.get_input_embeddings().num_embeddings)


def close_engine(engine) -> dict:
    started, flushed = time.perf_counter(), engine.cache_registry.flush(None)  # no timeout: wait for every write
    out = {"flush_s": time.perf_counter() - started, "flushed": flushed, "disk_end": disk_counters(engine),
           "cache_stats": engine.cache_stats(), "num_dropped_core": sum(s.num_dropped for s in engine.cache_registry.stats())}
    engine.close()
    return out


def phase_write(a) -> dict:  # process A: the cold request, then flush and close
    engine, load_s, hi = open_engine(a, cache_dir=a.dir)
    cold = request(engine, make_ids(a.length, a.length, hi))
    log(f"  A: cold TTFT {cold['ttft_s']:.2f} s, CPU use {cold['cpu_util']:.2f}; flushing")
    return {"load_s": load_s, "cold": cold, **close_engine(engine)}


def phase_restore(a) -> dict:  # process B: rounds of cold/warm page-cache hits and raw reads
    started = time.perf_counter()
    engine, load_s, hi = open_engine(a, cache_dir=a.dir)
    prompt, files = make_ids(a.length, a.length, hi), entry_files(a.dir)
    out = {"load_s": load_s, "disk_open": disk_counters(engine), "num_files": len(files),
           "file_bytes": sum(p.stat().st_size for p in files), "probe": engine.probe(prompt_ids=prompt).tokens_by_tier,
           "cold": [], "warm": [], "raw_cold": [], "raw_warm": []}
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
    return out | close_engine(engine) | {"cpu_util": cpu_now() / (time.perf_counter() - started)}


def phase_miss(a) -> dict:
    engine, load_s, hi = open_engine(a, **({"cache_dir": a.dir} if a.disk == "on" else {"use_disk_tier": False}))
    first = int(a.prompts.split(",")[0])
    request(engine, make_ids(WARMUP_TOKENS, MISS_SEED - 100 - 2 * first - (a.disk == "on"), hi))  # uncounted warm-up
    rows = [{"prompt": i, **request(engine, make_ids(random.Random(MISS_SEED + i).randint(1024, 2048), MISS_SEED + i, hi))}
            for i in map(int, a.prompts.split(","))]
    log(f"  miss disk={a.disk} prompts {a.prompts}: TTFT {[round(r['ttft_s'], 2) for r in rows]}, "
        f"CPU use {[round(r['cpu_util'], 2) for r in rows]}")
    return {"load_s": load_s, "requests": rows, **close_engine(engine)}


def run_child(a, phase: str, **extra: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "phase.json"
        argv = [sys.executable, __file__, "--phase", phase, "--phase-out", str(path), "--model", a.model,
                "--length", str(a.length), "--block-size", str(a.block_size)]
        subprocess.run(argv + [x for k, v in extra.items() for x in (f"--{k}", v)], check=True)
        return json.loads(path.read_text())


# -- parent: orchestrate, summarise, print ----------------------------------------------------------
def med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def p99(xs: list[float]) -> float:  # linear interpolation between order statistics (numpy's default)
    return statistics.quantiles(xs, n=100, method="inclusive")[98]


def hit_summary(hits: list[dict], cold_ttft: float, length: int) -> dict:
    d = {k: med(hits, k) for k in ("ttft_s", "lookup_s", "restore_s", "prefill_s", "cpu_util")}
    return d | {"disk_load_s": statistics.median(h["disk"]["load_s"] for h in hits), "speedup": cold_ttft / d["ttft_s"],
                "bytes": statistics.median(h["disk"]["load_bytes"] for h in hits),
                "tiers": [h["cached_tokens_by_tier"] for h in hits], "resident_before": [h["resident_before"] for h in hits],
                "all_from_disk": all(h["cached_tokens_by_tier"] == {"disk": length} for h in hits)}


def summarise(A: dict | None, B: dict | None, miss: dict[str, list[dict]], drops: dict[str, float]) -> dict:
    m = miss_summary(miss, drops)
    if A is None or B is None:  # --only miss
        return {"miss": m, "targets": {"miss_p99_le_1.05": m["p99_ratio_wall"] <= 1.05}}
    cold, length = A["cold"]["ttft_s"], A["cold"]["tokens"]
    h = {"first": hit_summary(B["cold"][:1], cold, length)}
    for kind in ("cold", "warm"):
        hits, raw = B[kind], med(B[f"raw_{kind}"], "bytes_per_s")
        tier_bw = statistics.median(x["disk"]["load_bytes"] / x["disk"]["load_s"] for x in hits)
        e2e_bw = statistics.median(x["disk"]["load_bytes"] / (x["lookup_s"] + x["restore_s"]) for x in hits)
        h[kind] = hit_summary(hits, cold, length) | {
            "tier_bw": tier_bw, "e2e_bw": e2e_bw, "raw_bw": raw, "tier_vs_raw": tier_bw / raw, "e2e_vs_raw": e2e_bw / raw,
            "raw_resident_before": [x["resident_before"] for x in B[f"raw_{kind}"]]}
    targets = {"restart_hit_10x": h["first"]["speedup"] >= 10 and h["first"]["all_from_disk"],
               "restore_70pct_raw_cold": h["cold"]["tier_vs_raw"] >= 0.7, "restore_70pct_raw_warm": h["warm"]["tier_vs_raw"] >= 0.7,
               "miss_p99_le_1.05": m["p99_ratio_wall"] <= 1.05}
    return {"cold_ttft_s": cold, "cold_cpu_util": A["cold"]["cpu_util"], "flush_after_cold_s": A["flush_s"],
            "hit": h, "miss": m, "targets": targets}


def miss_summary(miss: dict[str, list[dict]], drops: dict[str, float]) -> dict:
    m = {}
    for disk, rows in miss.items():
        m[disk] = {"n": len(rows), "drops": drops[disk], "cpu_util_median": med(rows, "cpu_util"),
                   "cpu_util_min": min(r["cpu_util"] for r in rows)}
        for key in ("ttft_s", "wall_s"):
            m[disk] |= {f"{key}_p50": med(rows, key), f"{key}_p99": p99([r[key] for r in rows])}
    on, off = ({r["prompt"]: r for r in miss[d]} for d in ("on", "off"))
    m |= {"p99_ratio_ttft": m["on"]["ttft_s_p99"] / m["off"]["ttft_s_p99"],
          "p99_ratio_wall": m["on"]["wall_s_p99"] / m["off"]["wall_s_p99"],
          "paired_median_ratio_wall": statistics.median(on[i]["wall_s"] / off[i]["wall_s"] for i in on)}
    return m


def tables(s: dict, L: int) -> str:
    h, out = s.get("hit"), []

    def row(name: str, d: dict) -> list[str]:
        return [name, f"{d['ttft_s']:.3f}", f"{d['lookup_s']:.3f}", f"{d['disk_load_s']:.3f}", f"{d['restore_s']:.3f}",
                f"{d['prefill_s']:.3f}", str(d["tiers"][0]), str(d["resident_before"]), f"{d['speedup']:.0f}x"]

    out += [] if h is None else md(f"1. {L}-token prompt: cold (process A, CPU use {s['cold_cpu_util']:.2f}) vs disk hit after a restart (B)",
             ["case", "TTFT (s)", "lookup incl. disk read (s)", "of which disk tier load (s)", "restore (s)", "prefill (s)",
              "cached tokens by tier", "entry bytes in page cache before", "speedup vs cold"],
             [["cold (A)", f"{s['cold_ttft_s']:.2f}", "", "", "", "", "", "", "1x"],
              row("disk hit, first request after restart, page cache dropped", h["first"]),
              row(f"disk hit, page cache dropped (median of {ROUNDS})", h["cold"]),
              row(f"disk hit, page cache warm (median of {ROUNDS})", h["warm"])])
    out += [] if h is None else md("2. Restore bandwidth vs raw sequential read (4 MiB readinto) of the same entry files, MB/s (medians)",
              ["page cache", "MB per restore", "disk tier load (mmap+checksum+decode)", "end-to-end (bytes / lookup+restore)",
               "raw read", "tier / raw", "end-to-end / raw"],
              [[k, f"{h[k]['bytes'] / MB:.0f}", *(f"{h[k][x] / MB:.0f}" for x in ("tier_bw", "e2e_bw", "raw_bw")),
                f"{h[k]['tier_vs_raw']:.0%}", f"{h[k]['e2e_vs_raw']:.0%}"] for k in ("cold", "warm")])
    m = s["miss"]
    out += md(f"3. Miss-only workload ({m['on']['n']} distinct prompts of 1-2K tokens per config)",
              ["disk tier", "TTFT p50 (s)", "TTFT p99 (s)", "total p50 (s)", "total p99 (s)", "CPU use median / min", "drops"],
              [[d, *(f"{m[d][k]:.2f}" for k in ("ttft_s_p50", "ttft_s_p99", "wall_s_p50", "wall_s_p99")),
                f"{m[d]['cpu_util_median']:.2f} / {m[d]['cpu_util_min']:.2f}", f"{m[d]['drops']:.0f}"] for d in ("on", "off")])
    out += ["", f"p99 on/off: TTFT {m['p99_ratio_ttft']:.3f}, total {m['p99_ratio_wall']:.3f}; median per-prompt "
            + f"on/off {m['paired_median_ratio_wall']:.3f}; write-behind flush at close (s): {m['flush_at_close_s']}", "",
            "Targets: " + ", ".join(f"{k} {'MET' if v else 'NOT MET'}" for k, v in s["targets"].items())]
    return "\n".join(out).lstrip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model folder (default: build/reuse the Qwen3-0.6B-shape bench model)")
    p.add_argument("--length", type=int, default=8192, help="restart-hit prompt length in tokens")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--miss-prompts", type=int, default=20, help="distinct prompts per config (a multiple of 4)")
    p.add_argument("--work-dir", help="folder for the cache directories (default: a new temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the cache directories")
    p.add_argument("--only", choices=["miss"], help="run only the miss-only part (3)")
    p.add_argument("--out", default="bench-out/disk_tier.json")
    for hidden in ("--phase", "--phase-out", "--dir", "--disk", "--prompts"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.phase:
        Path(a.phase_out).write_text(json.dumps({"write": phase_write, "restore": phase_restore, "miss": phase_miss}[a.phase](a)))
        return
    a.model, started = a.model or bench_model(), time.perf_counter()
    work = Path(a.work_dir or tempfile.mkdtemp(prefix="kvcellar-disk-bench-"))
    D, D2 = work / "restart", work / "miss"
    [shutil.rmtree(d, ignore_errors=True) for d in (D, D2)]
    try:
        log("1+2: skipped (--only miss)" if a.only else f"1+2: restart hit, L={a.length}, cache dir {D}")
        A = None if a.only else run_child(a, "write", dir=str(D))
        B = None if a.only else run_child(a, "restore", dir=str(D))
        q, miss, procs = a.miss_prompts // 4, {"on": [], "off": []}, {"on": [], "off": []}
        for k, disk in enumerate(["on", "off", "off", "on", "on", "off", "off", "on"]):
            ids = ",".join(str(i) for i in range(k // 2 * q, k // 2 * q + q))
            log(f"3: miss-only, disk tier {disk}, prompts {ids} (fresh process)")
            procs[disk].append(run_child(a, "miss", dir=str(D2), disk=disk, prompts=ids))
            miss[disk] += procs[disk][-1].pop("requests")
        drops = {d: sum(r["disk_end"].get("num_dropped", 0) for r in procs[d]) for d in procs}
        summary = summarise(A, B, miss, drops)
        summary["miss"]["flush_at_close_s"] = {d: [round(r["flush_s"], 2) for r in procs[d]] for d in procs}
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    hw = hardware()
    print(f"\n## kvcellar disk tier — {Path(a.model).name}, block {a.block_size}, bf16, {hw['cpu']}, {THREADS} threads, "
          f"torch {hw['torch']}, transformers {hw['transformers']}, {hw['date']}\n", flush=True)
    print(tables(summary, a.length), flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"hardware": hw, "model": a.model, "block_size": a.block_size, "length": a.length,
                               "work_dir": str(work), "summary": summary, "raw": {"A": A, "B": B, "miss": miss,
                               "miss_processes": procs}, "wall_s": time.perf_counter() - started}, indent=2, default=str))
    log(f"wrote {out} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
