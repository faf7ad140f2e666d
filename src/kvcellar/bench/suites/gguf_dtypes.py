"""GGUF-dtypes suite: a GGUF file's execution choices on this machine: load time, memory and speed per dtype.

Operations: `GgufDtypesConfig`, `run(config) -> dict` (prints the table,
writes the JSON), `measure_dtype(spec)` (one dtype, in its own process),
`packed_kernels_available()`.

Without a model it uses the demo model's file (fetched once). For each dtype,
in a fresh process (so memory figures do not mix) with a fresh conversion
folder: the first load (transformers' GGUF loader dequantizes, kvcellar
writes the folder), a second load from that folder (what every later start
pays), a cold prefill of `length` seeded token ids (cache off) and
one-stream decode of 128 tokens, then RSS. Packed execution (weights left in
GGUF blocks) needs transformers' GGUF matmul kernels, which it fetches from
the Hub through the `kernels` package; the suite reports whether this
machine has them.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kvcellar.bench.progress import log
from kvcellar.bench.report import table
from kvcellar.bench.suites.fresh_process import run_in_fresh_process

DTYPES = ("bfloat16", "float32")
DECODE_TOKENS = 128


@dataclass(frozen=True, slots=True)
class GgufDtypesConfig:
    """`model` None: the demo model's .gguf file."""

    model: str | None = None
    dtypes: tuple[str, ...] = DTYPES
    length: int = 2048
    out: str = "bench-out/gguf_dtypes.json"

    def __post_init__(self) -> None:
        unknown = [d for d in self.dtypes if d not in DTYPES]
        if not self.dtypes or unknown:
            raise ValueError(f"--dtypes must list some of {', '.join(DTYPES)} (got {self.dtypes!r})")
        if self.model is not None and not self.model.endswith(".gguf"):
            raise ValueError(f"--model must be a .gguf file (got {self.model!r})")
        if self.length < 1:
            raise ValueError(f"--length must be >= 1 (got {self.length})")


def measure_dtype(spec: dict) -> dict:
    """One dtype, in this process: conversion, cached load, cold prefill, decode, RSS."""
    from kvcellar import CacheConfig, Engine
    from kvcellar.bench.hardware import memory_report
    from kvcellar.bench.scenarios import make_ids
    from kvcellar.engine.loader import load_model

    file, dtype = spec["model"], spec["dtype"]
    home = Path(tempfile.mkdtemp(prefix="gguf-dtypes-"))
    started = time.perf_counter()
    load_model(file, device="cpu", dtype=dtype, home=home)
    first_load_s = time.perf_counter() - started
    os.environ["KVCELLAR_HOME"] = str(home)
    started = time.perf_counter()
    engine = Engine.load(file, device="cpu", dtype=dtype, cache=CacheConfig(enabled=False))
    cached_load_s = time.perf_counter() - started
    engine.generate(prompt_ids=make_ids(256, "warm-up", 8000), max_tokens=4, ignore_eos=True)
    cold = engine.generate(prompt_ids=make_ids(spec["length"], "prompt", 8000), max_tokens=1, ignore_eos=True)
    decode = engine.generate(prompt_ids=make_ids(64, "decode", 8000), max_tokens=DECODE_TOKENS, ignore_eos=True)
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


def run(config: GgufDtypesConfig) -> dict:
    import torch

    model = config.model
    if model is None:
        from kvcellar.models import ensure_demo_model

        model = str(ensure_demo_model(progress=log))
    rows = []
    for dtype in config.dtypes:
        rows.append(run_in_fresh_process(measure_dtype, {"model": model, "dtype": dtype, "length": config.length}))
        log(f"{dtype}: {rows[-1]}")
    lines = table(["dtype", "first load (convert)", "later load", "RSS after the runs", "converted folder",
                   f"cold {config.length}", "decode"],
                  [[r["dtype"], f"{r['first_load_s']:.1f} s", f"{r['cached_load_s']:.1f} s", f"{r['rss_mib']:.0f} MiB",
                    f"{r['converted_mib']:.0f} MiB", f"{r['cold_s']:.2f} s", f"{r['decode_tok_s']:.1f} tok/s"]
                   for r in rows])  # fmt: skip
    packed = packed_kernels_available()
    text = "\n".join(lines) + f"\n\npacked (GGUF blocks kept): {packed}; CPU capability {torch.backends.cpu.get_cpu_capability()}"
    print(text)
    result = {"model": model, "rows": rows, "packed": packed, "load_average": os.getloadavg(), "table": text,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    log(f"wrote {out}")
    return result
