"""Benchmark results as files: results.json (everything) and results.md (tables a person reads).

Operations: `write_json(results, path)`, `markdown(results) -> str`,
`ttft_matrix(results) -> str` (the headline table alone, for the terminal),
`table(header, rows)` and `section(title, header, rows)` (markdown lines,
also used by the suites).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from kvcellar.config import format_size


def write_json(results: dict, path: Path) -> None:
    """Strict JSON: a non-finite float (a percentile of nothing) is written as null."""
    path.write_text(json.dumps(_clean(results), indent=2, default=str, allow_nan=False) + "\n")


def _clean(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _s(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.3f}" if value >= 0.01 else f"{value * 1000:.2f} ms"


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}x"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def section(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    """A blank line, a `### title` heading, a blank line, then the table."""
    return ["", f"### {title}", "", *table(header, rows)]


def _modes(results: dict) -> list[str]:
    return [p["mode"] for p in results["phases"] if not p.get("skipped")]


def ttft_matrix(results: dict) -> str:
    """TTFT p50 per scenario (rows) and mode (columns), with the speedup of the main cache mode."""
    rows, modes = results["rows"], _modes(results)
    index = {(r["label"], r["mode"]): r for r in rows}
    labels = list(dict.fromkeys(r["label"] for r in rows))
    main = results["main_mode"]
    body = [[label, *(_s(index[(label, m)]["ttft_p50_s"]) if (label, m) in index else "" for m in modes),
             _x(index[(label, main)]["speedup"]) if (label, main) in index else ""] for label in labels]  # fmt: skip
    header = ["scenario", *(f"{m} (s)" for m in modes), f"{main} vs {results['baseline_mode']}"]
    return "\n".join(table(header, body))


def _details(rows: list[dict]) -> list[str]:
    header = ["scenario", "mode", "n", "prompt tok", "TTFT p50", "p90", "p99", "total p50", "lookup p50",
              "restore p50", "prefill p50", "hit rate", "by tier", "tokens saved", "speedup"]  # fmt: skip
    body = [[r["label"], r["mode"], str(r["num_requests"]), f"{r['mean_prompt_tokens']:.0f}", _s(r["ttft_p50_s"]),
             _s(r["ttft_p90_s"]), _s(r["ttft_p99_s"]), _s(r["total_p50_s"]), _s(r["lookup_p50_s"]),
             _s(r["restore_p50_s"]), _s(r["prefill_p50_s"]), f"{r['hit_rate']:.0%}",
             ", ".join(f"{t} {v:.0%}" for t, v in r["hit_rate_by_tier"].items()) or "—",
             str(r["num_saved_tokens"]), _x(r["speedup"])] for r in rows]  # fmt: skip
    return table(header, body)


def _phases(results: dict) -> list[str]:
    header = ["mode", "what it is", "tiers", "wall (s)", "CPU use", "peak RSS (MiB)", "status"]
    body = []
    for p in results["phases"]:
        usage, memory = p.get("usage", {}), p.get("memory", {})
        tiers = ", ".join(p.get("info", {}).get("tiers", [])) or "—"
        status = f"skipped: {p['skipped']}" if p.get("skipped") else "ran"
        peak = f"{memory['peak_rss_mib']:.0f}" if memory.get("peak_rss_mib") else "—"
        if memory.get("cuda_peak_mib"):
            peak += f" (CUDA {memory['cuda_peak_mib']:.0f})"
        wall, cpu = (f"{usage['wall_s']:.1f}", f"{usage['cpu_util']:.2f}") if usage else ("—", "—")
        body.append([p["mode"], p["description"], tiers, wall, cpu, peak, status])
    return table(header, body)


def _hardware_lines(results: dict) -> list[str]:
    hw, cfg = results["hardware"], results["config"]
    gpu = f"; GPU {hw['gpu']} ({format_size(hw['gpu_memory_bytes'])}, CUDA {hw.get('cuda')})" if hw.get("gpu") else ""
    engine = cfg.get("engine") or {}
    ran = next((p["info"] for p in results["phases"] if p.get("info", {}).get("device")), {})
    setup = (f"device {ran.get('device', engine.get('device'))}, dtype {ran.get('dtype', engine.get('dtype'))}, "
             f"block {engine.get('block_size')}, "
             f"threads {engine.get('num_threads') or hw['torch_threads']}, exact {engine.get('cache', {}).get('exact')}, "
             f"device tier {format_size(engine.get('cache', {}).get('device_cache_bytes', 0))}") if engine else \
        f"server {results.get('server', {}).get('url')}"  # fmt: skip
    mem = format_size(hw["memory_bytes"]) if hw.get("memory_bytes") else "?"
    return [
        f"- Date: {hw['date']}; command: `{cfg.get('command') or 'kvcellar bench'}`",
        f"- Hardware: {hw['cpu']} ({hw['cpus_usable']} of {hw['cpu_count']} CPUs usable, {mem} RAM){gpu}",
        f"- Software: torch {hw['torch']}, transformers {hw['transformers']}, kvcellar {hw['kvcellar']}, "
        f"Python {hw['python']}, {hw['platform']}",
        f"- Model: `{results['model']}`; {setup}; max_tokens {cfg['max_tokens']}; seed {cfg['seed']}",
        f"- Wall time {results['wall_s']:.0f} s; CPU use of the phases {results['usage']['cpu_util']:.2f} of "
        f"{hw['cpus_usable']} CPUs (CPU s / wall s; about the thread count when the cores were ours); "
        f"1-minute load average {hw.get('loadavg_1m') or 0:.2f} at the start, "
        f"{results['usage'].get('loadavg_1m') or 0:.2f} at the end",
    ]


def markdown(results: dict) -> str:
    stopped = results.get("stopped_early")
    warning = [f"**Partial results: the run stopped early ({stopped}).**", ""] if stopped else []
    lines = [f"# kvcellar bench: {results['target']}", "", *warning, *_hardware_lines(results), "",
             f"## TTFT p50 by scenario and mode (speedup: {results['baseline_mode']} TTFT / {results['main_mode']} TTFT)",
             "", ttft_matrix(results), "", "## Details", "",
             "Times in seconds unless marked ms. Hit rate = cached / prompt tokens; by tier: where the cached tokens "
             "came from. lookup / restore / prefill: the fetch overhead split of TTFT (lookup = find the entries "
             "and load them from their tier; restore = assemble the transformers cache; prefill = the uncached "
             "rest). With --url they are the server's own figures; TTFT is the client's first streamed chunk.", "",
             *_details(results["rows"]), "", "## Phases", "", *_phases(results), "", "## Checks", ""]  # fmt: skip
    lines += [f"- {problem}" for problem in results["checks"]] or ["- every figure is consistent (exact repeats fully "
                                                                    "cached, nothing cached with the cache off, tiers add up)"]
    lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in results.get("plots", [])]
    return "\n".join(lines) + "\n"
