"""A GGUF file's execution choices on this machine: load time, memory and speed per dtype.

Run:  PYTHONPATH=src .venv/bin/python bench/gguf_dtypes.py [--model FILE.gguf] [--dtypes bfloat16,float32]
          [--length 2048] [--out bench-out/gguf_dtypes.json]

Without --model it uses the demo model's file (fetched once). For each dtype, in a fresh process
(so memory figures do not mix) with a fresh conversion folder: the first load (transformers'
GGUF loader dequantizes, kvcellar writes the folder), a second load from that folder (what every
later start pays), RSS after it, a cold prefill of `--length` seeded token ids (cache off) and
one-stream decode of 128 tokens, then RSS. Packed execution (weights left in GGUF blocks) needs
transformers' GGUF matmul kernels, which it fetches from the Hub through the `kernels` package;
the script reports whether this machine has them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(file: str, dtype: str, length: int) -> dict:
    """One dtype, in this process: conversion, cached load, RSS, cold prefill, decode."""
    from kvcellar import CacheConfig, Engine
    from kvcellar.bench.hardware import memory_report
    from kvcellar.bench.scenarios import make_ids
    from kvcellar.engine.loader import load_model

    home = Path(tempfile.mkdtemp(prefix="gguf-dtypes-"))
    started = time.perf_counter()
    load_model(file, device="cpu", dtype=dtype, home=home)
    first_load_s = time.perf_counter() - started
    os.environ["KVCELLAR_HOME"] = str(home)
    started = time.perf_counter()
    engine = Engine.load(file, device="cpu", dtype=dtype, cache=CacheConfig(enabled=False))
    cached_load_s = time.perf_counter() - started
    engine.generate(prompt_ids=make_ids(256, "warm-up", 8000), max_tokens=4, ignore_eos=True)
    cold = engine.generate(prompt_ids=make_ids(length, "prompt", 8000), max_tokens=1, ignore_eos=True)
    decode = engine.generate(prompt_ids=make_ids(64, "decode", 8000), max_tokens=128, ignore_eos=True)
    rss_mib = memory_report()["rss_mib"]  # every weight has been read by now
    engine.close()
    folder_bytes = sum(p.stat().st_size for p in (home / "models" / "gguf").rglob("*") if p.is_file())
    return {"dtype": dtype, "first_load_s": first_load_s, "cached_load_s": cached_load_s, "rss_mib": rss_mib,
            "converted_mib": folder_bytes / 2**20, "cold_s": cold.timings.ttft_s,
            "decode_tok_s": decode.timings.decode_tok_s}  # fmt: skip


def packed_kernels_available() -> str:
    try:
        from transformers.integrations.gguf.kernels import get_gguf_kernel

        return "yes" if get_gguf_kernel() else "no (no GGUF matmul kernel published for this device)"
    except Exception as exc:  # no `kernels` package, or no Hub to fetch kernels from
        return f"no ({type(exc).__name__}: {exc})"[:200]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a .gguf file (default: the demo model)")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--out", default="bench-out/gguf_dtypes.json")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one dtype, print JSON
    args = parser.parse_args(argv)
    if args.model is None:
        from kvcellar.models import ensure_demo_model

        args.model = str(ensure_demo_model(progress=lambda m: print(m, file=sys.stderr)))
    if args.one:
        print(json.dumps(measure(args.model, args.one, args.length)))
        return 0
    rows = []
    for dtype in args.dtypes.split(","):
        done = subprocess.run([sys.executable, __file__, "--model", args.model, "--one", dtype, "--length", str(args.length)],
                              capture_output=True, text=True, check=True)  # fmt: skip
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{dtype}: {rows[-1]}", file=sys.stderr)
    import torch

    lines = [f"| dtype | first load (convert) | later load | RSS after the runs | converted folder | cold {args.length} | decode |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['dtype']} | {r['first_load_s']:.1f} s | {r['cached_load_s']:.1f} s | {r['rss_mib']:.0f} MiB | "
              f"{r['converted_mib']:.0f} MiB | {r['cold_s']:.2f} s | {r['decode_tok_s']:.1f} tok/s |" for r in rows]  # fmt: skip
    packed = packed_kernels_available()
    text = "\n".join(lines) + f"\n\npacked (GGUF blocks kept): {packed}; CPU capability {torch.backends.cpu.get_cpu_capability()}"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "rows": rows, "packed": packed, "load_average": os.getloadavg(),
                               "table": text, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
