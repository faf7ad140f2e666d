"""Chunking suite: chunked vs one-pass cold prefill on CPU, interleaved in one process.

Operations: `ChunkingConfig`, `run(config) -> dict` (prints the table, writes
the JSON), `measure(model, length, block_size, chunks, rounds, vocab)`.

What it compares, on the bare model (no prefix cache, nothing captured), for
each prompt length L:
- `one pass`: one forward of all L tokens into a plain transformers `DynamicCache`;
- `chunk C`: the engine's own prefill (`engine/prefill.py`: chunks of C up to
  the last whole chunk, then one block at a time; K/V appended in place by
  `GrowingLayer`, chunks before the last skip the LM head).
Each round runs every variant once, in a rotated order, on fresh seeded
random token ids, after one uncounted warm-up pass per variant; medians over
rounds. Interleaving is the point: a small shared VM drifts over minutes, so
variants timed minutes apart (as in the prefix-cache suite, whose one-pass
forward also runs after the engine returned its freed heap to the OS and
pays fresh page faults) compare drift as much as chunking. CPU use = process
CPU s / wall s. Same model folder, threads and dtype as the prefix-cache suite.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from kvcellar.bench.hardware import Usage, hardware
from kvcellar.bench.progress import log
from kvcellar.bench.report import section
from kvcellar.bench.scenarios import make_ids

THREADS = 2


@dataclass(frozen=True, slots=True)
class ChunkingConfig:
    """`model` None: the bench's Qwen3-0.6B-shape folder. Every chunk size must be a multiple of the block."""

    model: str | None = None
    lengths: tuple[int, ...] = (2048, 8192)
    block_size: int = 256
    chunks: tuple[int, ...] = (256, 512, 1024)
    rounds: int = 3
    out: str = "bench-out/chunking.json"
    command: str = ""

    def __post_init__(self) -> None:
        if self.block_size < 1 or not self.lengths or any(n < self.block_size for n in self.lengths):
            raise ValueError(f"--lengths must list prompt lengths of at least one block ({self.block_size} tokens)")
        bad = [c for c in self.chunks if c < self.block_size or c % self.block_size]
        if not self.chunks or bad:
            raise ValueError(f"--chunks must be multiples of the block size {self.block_size} (got {self.chunks!r})")
        if self.rounds < 1:
            raise ValueError(f"--rounds must be >= 1 (got {self.rounds})")


def _one_pass(model: object, ids: object) -> None:
    import torch
    from transformers import DynamicCache

    with torch.inference_mode():
        model(input_ids=ids.unsqueeze(0), past_key_values=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)


def _chunked(model: object, ids: object, block_size: int, chunk_size: int) -> None:
    from kvcellar.engine.prefill import prefill
    from kvcellar.kv.growing_layer import new_cache

    prefill(model, new_cache(model.config, ids.shape[0] + 1, None), ids, 0, block_size, chunk_size=chunk_size)


def measure(model: object, length: int, block_size: int, chunks: tuple[int, ...], rounds: int, vocab: int) -> dict:
    import torch

    variants = {"one pass": lambda ids: _one_pass(model, ids)}
    variants.update({f"chunk {c}": (lambda ids, c=c: _chunked(model, ids, block_size, c)) for c in chunks})
    names = list(variants)
    for name in names:  # first long forwards of a process pay one-time allocator and page-fault costs
        variants[name](torch.tensor(make_ids(length, -1, vocab)))
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_index in range(rounds):
        order = names[round_index % len(names):] + names[: round_index % len(names)]
        for name in order:
            ids = torch.tensor(make_ids(length, 1000 * round_index + names.index(name), vocab))
            usage = Usage.start()
            variants[name](ids)
            used = usage.finish()
            runs[name].append({"wall_s": used["wall_s"], "cpu_use": used["cpu_util"]})
            log(f"  L={length} round {round_index + 1}: {name} {used['wall_s']:.2f} s (CPU use {used['cpu_util']:.2f})")
    base = statistics.median(r["wall_s"] for r in runs["one pass"])
    summary = {name: {"median_s": statistics.median(r["wall_s"] for r in rs), "runs_s": [r["wall_s"] for r in rs],
                      "cpu_use": [round(r["cpu_use"], 2) for r in rs]} for name, rs in runs.items()}  # fmt: skip
    for row in summary.values():
        row["vs_one_pass"] = row["median_s"] / base
    return summary


def run(config: ChunkingConfig) -> dict:
    import torch

    from kvcellar.bench.runner import bench_model_dir
    from kvcellar.engine.loader import load_model

    torch.set_num_threads(THREADS)
    model_dir = config.model or str(bench_model_dir(progress=log))
    loaded = load_model(model_dir, device="cpu")
    vocab = loaded.model.get_input_embeddings().num_embeddings
    results = {}
    for length in config.lengths:
        log(f"L={length}: one pass vs chunks {list(config.chunks)}, {config.rounds} rounds")
        results[length] = measure(loaded.model, length, config.block_size, config.chunks, config.rounds, vocab)
    rows = [[str(length), name, f"{row['median_s']:.2f}", f"{row['vs_one_pass']:.2f}x",
             ", ".join(f"{s:.2f}" for s in row["runs_s"]), ", ".join(map(str, row["cpu_use"]))]
            for length, summary in results.items() for name, row in summary.items()]  # fmt: skip
    table = section(f"Cold prefill, one pass vs chunked (block {config.block_size}), medians of {config.rounds} "
                    "interleaved rounds", ["L", "variant", "median (s)", "vs one pass", "runs (s)", "CPU use of 2"], rows)
    print("\n".join(table))
    result = {"hardware": hardware("cpu"), "model": model_dir, "block_size": config.block_size, "command": config.command,
              "results": results}  # fmt: skip
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    log(f"wrote {out}")
    return result
