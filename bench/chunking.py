"""Chunked vs one-pass cold prefill on CPU, interleaved in one process.

Run:  PYTHONPATH=src .venv/bin/python bench/chunking.py [--model DIR] [--lengths 2048,8192] \
          [--block-size 256] [--chunks 256,512,1024] [--rounds 3] [--out bench-out/chunking.json]

What it compares, on the bare model (no prefix cache, nothing captured), for each prompt length L:
- `one pass`: one forward of all L tokens into a plain transformers `DynamicCache`;
- `chunk C`: the engine's own prefill (`engine/prefill.py`: chunks of C up to the last whole chunk,
  then one block at a time; K/V appended in place by `GrowingLayer`, chunks before the last skip the LM head).
Each round runs every variant once, in a rotated order, on fresh seeded random token ids, after one
uncounted warm-up pass per variant; medians over rounds. Interleaving is the point: this 2-core VM
drifts by 10-20% over minutes, so variants timed minutes apart (as in prefix_cache.py, whose one-pass
forward also runs after the engine returned its freed heap to the OS and pays fresh page faults)
compare drift as much as chunking. CPU use = process CPU s / wall s (about 1.9 of 2 when the cores
were ours). Same model folder, threads and dtype as prefix_cache.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prefix_cache import THREADS, bench_model, hardware, log, make_ids, md


def one_pass(model, ids) -> None:
    import torch
    from transformers import DynamicCache

    with torch.inference_mode():
        model(input_ids=ids.unsqueeze(0), past_key_values=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)


def chunked(model, ids, block_size: int, chunk_size: int) -> None:
    from kvcellar.engine.prefill import prefill
    from kvcellar.kv.growing_layer import new_cache

    prefill(model, new_cache(model.config, ids.shape[0] + 1), ids, 0, block_size, chunk_size=chunk_size)


def timed(run) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return wall, cpu / wall


def measure(model, length: int, block_size: int, chunks: list[int], rounds: int, vocab: int) -> dict:
    import torch

    variants = {"one pass": lambda ids: one_pass(model, ids)}
    variants.update({f"chunk {c}": (lambda ids, c=c: chunked(model, ids, block_size, c)) for c in chunks})
    names = list(variants)
    for name in names:  # first long forwards of a process pay one-time allocator and page-fault costs
        variants[name](torch.tensor(make_ids(length, -1, vocab)))
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_index in range(rounds):
        order = names[round_index % len(names):] + names[: round_index % len(names)]
        for name in order:
            ids = torch.tensor(make_ids(length, 1000 * round_index + names.index(name), vocab))
            wall, use = timed(lambda: variants[name](ids))
            runs[name].append({"wall_s": wall, "cpu_use": use})
            log(f"  L={length} round {round_index + 1}: {name} {wall:.2f} s (CPU use {use:.2f})")
    base = statistics.median(r["wall_s"] for r in runs["one pass"])
    summary = {name: {"median_s": statistics.median(r["wall_s"] for r in rs), "runs_s": [r["wall_s"] for r in rs],
                      "cpu_use": [round(r["cpu_use"], 2) for r in rs]} for name, rs in runs.items()}  # fmt: skip
    for row in summary.values():
        row["vs_one_pass"] = row["median_s"] / base
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model folder (default: the Qwen3-0.6B-shape bench folder, built once)")
    p.add_argument("--lengths", default="2048,8192")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--chunks", default="256,512,1024", help="prefill chunk sizes to compare (multiples of the block)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="bench-out/chunking.json")
    a = p.parse_args()

    import torch

    from kvcellar.engine.loader import load_model

    torch.set_num_threads(THREADS)
    model_dir = a.model or bench_model()
    loaded = load_model(model_dir, device="cpu")
    vocab = loaded.model.get_input_embeddings().num_embeddings
    chunks = [int(c) for c in a.chunks.split(",")]
    results = {}
    for length in (int(n) for n in a.lengths.split(",")):
        log(f"L={length}: one pass vs chunks {chunks}, {a.rounds} rounds")
        results[length] = measure(loaded.model, length, a.block_size, chunks, a.rounds, vocab)
    rows = [[str(length), name, f"{row['median_s']:.2f}", f"{row['vs_one_pass']:.2f}x",
             ", ".join(f"{s:.2f}" for s in row["runs_s"]), ", ".join(map(str, row["cpu_use"]))]
            for length, summary in results.items() for name, row in summary.items()]  # fmt: skip
    table = md(f"Cold prefill, one pass vs chunked (block {a.block_size}), medians of {a.rounds} interleaved rounds",
               ["L", "variant", "median (s)", "vs one pass", "runs (s)", "CPU use of 2"], rows)
    print("\n".join(table))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"hardware": hardware(), "model": model_dir, "block_size": a.block_size,
                               "command": " ".join(sys.argv), "results": results}, indent=2))  # fmt: skip
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
