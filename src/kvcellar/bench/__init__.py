"""`kvcellar bench`: reproducible prompt-cache benchmarks (JSON, a markdown table, PNG plots).

Modules: `config` (BenchConfig, workload sizes, --quick presets), `scenarios`
(seeded token-id prompts: cold / exact repeat / nearest prefix, multi-turn
chat, document Q&A, agent loop, after-restart), `targets` (in-process engine,
HTTP server), `handwritten` (the transformers deepcopy baseline), `phases`
(modes: no-cache, kvcellar, after-restart, hf-deepcopy, tier-forced; one
process each), `summary` (percentiles, hit rates, checks), `report` (JSON,
markdown), `plots` (matplotlib), `hardware` (machine facts, CPU share,
memory), `runner` (run_bench), `children` (phase processes reaped with the
bench), `progress` (the run's bar and log line). `suites/`: the focused
measurements of `kvcellar bench SUITE` (prefix-cache, disk-tier, chunking,
gguf-dtypes, side-by-side), built on the same helpers.

Operations: `run_bench(config) -> results`, `bench_model_dir()`.
"""

from kvcellar.bench.config import (
    DEFAULT_LENGTHS,
    FULL_SIZES,
    QUICK_LENGTHS,
    QUICK_SIZES,
    BenchConfig,
    WorkloadSizes,
    default_lengths,
    parse_lengths,
)
from kvcellar.bench.runner import bench_model_dir, plan_modes, run_bench

__all__ = [
    "DEFAULT_LENGTHS", "FULL_SIZES", "QUICK_LENGTHS", "QUICK_SIZES", "BenchConfig", "WorkloadSizes",
    "bench_model_dir", "default_lengths", "parse_lengths", "plan_modes", "run_bench",
]  # fmt: skip
