"""Disk-tier suite: restart hit vs cold, restore vs raw read bandwidth, miss-only p99 with the tier on / off.

Operations: `DiskTierConfig`, `run(config) -> dict` (prints the tables,
writes the JSON), `summarise(A, B, miss, drops)`, `tables(summary, length)`.

The bench's Qwen3-0.6B-shape folder, bf16, 2 threads, seeded random token
ids, 1 token per request, exact mode, each phase in a fresh process
(`disk_tier_phase`).
1. Restart hit: process A (`CacheConfig(cache_dir=D)`) sends the L-token
   prompt cold, flushes the write-behind queue (timed), closes. Process B
   opens D (device tier empty) and sends it again: TTFT, restored tokens per
   tier (must be all "disk"), split lookup (includes the disk read: tiers load
   inside the lookup) / restore (K/V into a DynamicCache) / prefill. "Page
   cache dropped" = `echo 3 > /proc/sys/vm/drop_caches` when permitted, plus
   posix_fadvise(DONTNEED) on every entry file (`fincore`: resident fraction
   before). B runs 3 rounds: dropped hit, warm hit, dropped raw read, warm raw
   read (device tier cleared before each).
2. Restore bandwidth from those rounds: the disk tier's counters (file bytes
   / s in its loads: mmap + checksum + decode) and end-to-end (bytes /
   (lookup + restore)) vs reading the same files sequentially (4 MiB readinto
   one buffer).
3. Miss-only: N distinct 1-2K-token prompts (all miss; blocks written through
   to disk behind), with `CacheConfig(cache_dir=D2)` (on) /
   `CacheConfig(use_disk_tier=False)` (off), N/4 per process in order
   on,off,off,on,on,off,off,on (drift cancels), after one uncounted 512-token
   request: TTFT and total p50/p99 (interpolated), p99 on/off, write-behind
   drops. CPU use = process CPU s / wall s per request (near the thread count
   on idle cores; far less means the cores were shared: rerun).
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kvcellar.bench.hardware import hardware
from kvcellar.bench.progress import log
from kvcellar.bench.report import section
from kvcellar.bench.suites.disk_tier_phase import MB, ROUNDS, THREADS, miss_phase, restore_phase, write_phase
from kvcellar.bench.suites.fresh_process import run_in_fresh_process

MISS_ORDER = ("on", "off", "off", "on", "on", "off", "off", "on")  # each arm's processes spread over the run


@dataclass(frozen=True, slots=True)
class DiskTierConfig:
    """`model` None: the bench's Qwen3-0.6B-shape folder. `only_miss`: part 3 alone. `work_dir` None: a temp folder."""

    model: str | None = None
    length: int = 8192
    block_size: int = 256
    miss_prompts: int = 20
    work_dir: str | None = None
    keep: bool = False
    only_miss: bool = False
    out: str = "bench-out/disk_tier.json"

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.length < self.block_size:
            raise ValueError(f"--length must be at least one block of --block-size tokens (got {self.length} and "
                             f"{self.block_size})")  # fmt: skip
        if self.miss_prompts < 4 or self.miss_prompts % 4:
            raise ValueError(f"--miss-prompts must be a multiple of 4 (a quarter per process; got {self.miss_prompts})")


def _med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def p99(xs: list[float]) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    return statistics.quantiles(xs, n=100, method="inclusive")[98]


def hit_summary(hits: list[dict], cold_ttft: float, length: int) -> dict:
    d = {k: _med(hits, k) for k in ("ttft_s", "lookup_s", "restore_s", "prefill_s", "cpu_util")}
    return d | {"disk_load_s": statistics.median(h["disk"]["load_s"] for h in hits), "speedup": cold_ttft / d["ttft_s"],
                "bytes": statistics.median(h["disk"]["load_bytes"] for h in hits),
                "tiers": [h["cached_tokens_by_tier"] for h in hits], "resident_before": [h["resident_before"] for h in hits],
                "all_from_disk": all(h["cached_tokens_by_tier"] == {"disk": length} for h in hits)}  # fmt: skip


def miss_summary(miss: dict[str, list[dict]], drops: dict[str, float]) -> dict:
    m = {}
    for disk, rows in miss.items():
        m[disk] = {"n": len(rows), "drops": drops[disk], "cpu_util_median": _med(rows, "cpu_util"),
                   "cpu_util_min": min(r["cpu_util"] for r in rows)}  # fmt: skip
        for key in ("ttft_s", "wall_s"):
            m[disk] |= {f"{key}_p50": _med(rows, key), f"{key}_p99": p99([r[key] for r in rows])}
    on, off = ({r["prompt"]: r for r in miss[d]} for d in ("on", "off"))
    m |= {"p99_ratio_ttft": m["on"]["ttft_s_p99"] / m["off"]["ttft_s_p99"],
          "p99_ratio_wall": m["on"]["wall_s_p99"] / m["off"]["wall_s_p99"],
          "paired_median_ratio_wall": statistics.median(on[i]["wall_s"] / off[i]["wall_s"] for i in on)}  # fmt: skip
    return m


def summarise(A: dict | None, B: dict | None, miss: dict[str, list[dict]], drops: dict[str, float]) -> dict:
    m = miss_summary(miss, drops)
    if A is None or B is None:  # only_miss
        return {"miss": m, "targets": {"miss_p99_le_1.05": m["p99_ratio_wall"] <= 1.05}}
    cold, length = A["cold"]["ttft_s"], A["cold"]["tokens"]
    h = {"first": hit_summary(B["cold"][:1], cold, length)}
    for kind in ("cold", "warm"):
        hits, raw = B[kind], _med(B[f"raw_{kind}"], "bytes_per_s")
        tier_bw = statistics.median(x["disk"]["load_bytes"] / x["disk"]["load_s"] for x in hits)
        e2e_bw = statistics.median(x["disk"]["load_bytes"] / (x["lookup_s"] + x["restore_s"]) for x in hits)
        h[kind] = hit_summary(hits, cold, length) | {
            "tier_bw": tier_bw, "e2e_bw": e2e_bw, "raw_bw": raw, "tier_vs_raw": tier_bw / raw, "e2e_vs_raw": e2e_bw / raw,
            "raw_resident_before": [x["resident_before"] for x in B[f"raw_{kind}"]]}  # fmt: skip
    targets = {"restart_hit_10x": h["first"]["speedup"] >= 10 and h["first"]["all_from_disk"],
               "restore_70pct_raw_cold": h["cold"]["tier_vs_raw"] >= 0.7, "restore_70pct_raw_warm": h["warm"]["tier_vs_raw"] >= 0.7,
               "miss_p99_le_1.05": m["p99_ratio_wall"] <= 1.05}  # fmt: skip
    return {"cold_ttft_s": cold, "cold_cpu_util": A["cold"]["cpu_util"], "flush_after_cold_s": A["flush_s"],
            "hit": h, "miss": m, "targets": targets}  # fmt: skip


def tables(s: dict, length: int) -> str:
    h, out = s.get("hit"), []

    def row(name: str, d: dict) -> list[str]:
        return [name, f"{d['ttft_s']:.3f}", f"{d['lookup_s']:.3f}", f"{d['disk_load_s']:.3f}", f"{d['restore_s']:.3f}",
                f"{d['prefill_s']:.3f}", str(d["tiers"][0]), str(d["resident_before"]), f"{d['speedup']:.0f}x"]  # fmt: skip

    if h is not None:
        out += section(f"1. {length}-token prompt: cold (process A, CPU use {s['cold_cpu_util']:.2f}) vs disk hit after a "
                       "restart (B)",
                       ["case", "TTFT (s)", "lookup incl. disk read (s)", "of which disk tier load (s)", "restore (s)",
                        "prefill (s)", "cached tokens by tier", "entry bytes in page cache before", "speedup vs cold"],
                       [["cold (A)", f"{s['cold_ttft_s']:.2f}", "", "", "", "", "", "", "1x"],
                        row("disk hit, first request after restart, page cache dropped", h["first"]),
                        row(f"disk hit, page cache dropped (median of {ROUNDS})", h["cold"]),
                        row(f"disk hit, page cache warm (median of {ROUNDS})", h["warm"])])  # fmt: skip
        out += section("2. Restore bandwidth vs raw sequential read (4 MiB readinto) of the same entry files, MB/s (medians)",
                       ["page cache", "MB per restore", "disk tier load (mmap+checksum+decode)",
                        "end-to-end (bytes / lookup+restore)", "raw read", "tier / raw", "end-to-end / raw"],
                       [[k, f"{h[k]['bytes'] / MB:.0f}", *(f"{h[k][x] / MB:.0f}" for x in ("tier_bw", "e2e_bw", "raw_bw")),
                         f"{h[k]['tier_vs_raw']:.0%}", f"{h[k]['e2e_vs_raw']:.0%}"] for k in ("cold", "warm")])  # fmt: skip
    m = s["miss"]
    out += section(f"3. Miss-only workload ({m['on']['n']} distinct prompts of 1-2K tokens per config)",
                   ["disk tier", "TTFT p50 (s)", "TTFT p99 (s)", "total p50 (s)", "total p99 (s)", "CPU use median / min",
                    "drops"],
                   [[d, *(f"{m[d][k]:.2f}" for k in ("ttft_s_p50", "ttft_s_p99", "wall_s_p50", "wall_s_p99")),
                     f"{m[d]['cpu_util_median']:.2f} / {m[d]['cpu_util_min']:.2f}", f"{m[d]['drops']:.0f}"]
                    for d in ("on", "off")])  # fmt: skip
    out += ["", f"p99 on/off: TTFT {m['p99_ratio_ttft']:.3f}, total {m['p99_ratio_wall']:.3f}; median per-prompt "
            f"on/off {m['paired_median_ratio_wall']:.3f}; write-behind flush at close (s): {m['flush_at_close_s']}", "",
            "Targets: " + ", ".join(f"{k} {'MET' if v else 'NOT MET'}" for k, v in s["targets"].items())]  # fmt: skip
    return "\n".join(out).lstrip()


def _miss_part(config: DiskTierConfig, model: str, folder: Path) -> tuple[dict, dict]:
    quarter, miss, procs = config.miss_prompts // 4, {"on": [], "off": []}, {"on": [], "off": []}
    for k, disk in enumerate(MISS_ORDER):
        ids = ",".join(str(i) for i in range(k // 2 * quarter, k // 2 * quarter + quarter))
        log(f"3: miss-only, disk tier {disk}, prompts {ids} (fresh process)")
        spec = {"model": model, "length": config.length, "block_size": config.block_size, "dir": str(folder),
                "disk": disk, "prompts": ids}  # fmt: skip
        procs[disk].append(run_in_fresh_process(miss_phase, spec))
        miss[disk] += procs[disk][-1].pop("requests")
    return miss, procs


def run(config: DiskTierConfig) -> dict:
    from kvcellar.bench.runner import bench_model_dir

    started = time.perf_counter()
    model = config.model or str(bench_model_dir(progress=log))
    work = Path(config.work_dir or tempfile.mkdtemp(prefix="kvcellar-disk-bench-"))
    restart_dir, miss_dir = work / "restart", work / "miss"
    for folder in (restart_dir, miss_dir):
        shutil.rmtree(folder, ignore_errors=True)
    spec = {"model": model, "length": config.length, "block_size": config.block_size, "dir": str(restart_dir)}
    try:
        log("1+2: skipped (only the miss-only part)" if config.only_miss else
            f"1+2: restart hit, L={config.length}, cache dir {restart_dir}")  # fmt: skip
        A = None if config.only_miss else run_in_fresh_process(write_phase, spec)
        B = None if config.only_miss else run_in_fresh_process(restore_phase, spec)
        miss, procs = _miss_part(config, model, miss_dir)
        drops = {d: sum(r["disk_end"].get("num_dropped", 0) for r in procs[d]) for d in procs}
        summary = summarise(A, B, miss, drops)
        summary["miss"]["flush_at_close_s"] = {d: [round(r["flush_s"], 2) for r in procs[d]] for d in procs}
    finally:
        if not config.keep:
            shutil.rmtree(work, ignore_errors=True)
    hw = hardware("cpu")
    print(f"\n## kvcellar disk tier — {Path(model).name}, block {config.block_size}, bf16, {hw['cpu']}, {THREADS} threads, "
          f"torch {hw['torch']}, transformers {hw['transformers']}, {hw['date']}\n", flush=True)
    print(tables(summary, config.length), flush=True)
    result = {"hardware": hw, "model": model, "block_size": config.block_size, "length": config.length,
              "work_dir": str(work), "summary": summary, "raw": {"A": A, "B": B, "miss": miss, "miss_processes": procs},
              "wall_s": time.perf_counter() - started}  # fmt: skip
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    log(f"wrote {out} ({result['wall_s']:.0f} s)")
    return result
