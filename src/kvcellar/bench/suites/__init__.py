"""`kvcellar bench SUITE`: focused measurements beside the scenario bench, each writing one JSON file.

Suites (name -> module, each with a frozen `*Config` and `run(config) -> dict`):
`prefix-cache` (`prefix_cache`: cold vs cached TTFT, chunking overhead, peak
RSS per request; tables in `prefix_cache_tables`), `disk-tier` (`disk_tier`:
restart hit, restore vs raw read bandwidth, miss-only p99 with the tier on and
off), `chunking` (`chunking`: one-pass vs chunked cold prefill, interleaved),
`gguf-dtypes` (`gguf_dtypes`: a GGUF file's load, memory and speed per dtype),
`side-by-side` (`side_by_side`: kvcellar and peer servers over HTTP),
`concurrent` (`concurrent`: many clients at once against servers over HTTP),
`cluster` (`cluster`: servers sharing one Redis behind a cache-aware router
against servers sharing nothing, and the shared tier's restore bandwidth).
`fresh_process` runs a suite's phase in a new Python process, so that memory
peaks do not mix.

They reuse the scenario bench's helpers: seeded token ids
(`scenarios.make_ids`), machine facts and memory (`hardware`), the bench model
folder (`runner.bench_model_dir`), markdown tables (`report`), the log line
(`progress.log`). None asserts anything about speed; docs/benchmarks.md holds
the figures they measured.
"""

from __future__ import annotations

SUITES = ("prefix-cache", "disk-tier", "chunking", "gguf-dtypes", "side-by-side", "concurrent", "cluster")  # `kvcellar bench SUITE`
