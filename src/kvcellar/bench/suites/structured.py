"""Structured-output suite: what constrained decoding costs per generated token, in one process.

Operations: `StructuredConfig`, `run(config) -> dict` (prints the table, writes the JSON).

Three kinds of request on the same prompt, greedy, interleaved over `rounds` in a rotated order:
`free` (no grammar), `json-schema` (an object of a string, an integer and an array: a JSON Schema
response format) and `tool-call` (a forced call of one of two tools, chat/grammar.py). The grammars
end the answer when they complete, so the free request of each round generates as many tokens as the
constrained one before it (ignore_eos); the cache is cleared before each request. Reported per kind:
decode time per token (the engine's own `decode_s / decode tokens`), its ratio to `free`'s, and the
grammar's own share: the answer's tokens replayed through a fresh matcher, timing the mask of every
step and the token's acceptance. Also the grammar's first compile and a compiled one's reuse.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from kvcellar.bench.hardware import hardware
from kvcellar.bench.progress import log
from kvcellar.bench.report import section
from kvcellar.bench.scenarios import make_ids

SCHEMA = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40},
                                           "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                    "maxItems": 4}},
          "required": ["title", "year", "tags"], "additionalProperties": False}  # fmt: skip
TOOLS = [{"type": "function", "function": {"name": "search", "parameters": {
             "type": "object", "properties": {"query": {"type": "string", "maxLength": 40}}, "required": ["query"]}}},
         {"type": "function", "function": {"name": "open_page", "parameters": {
             "type": "object", "properties": {"url": {"type": "string", "maxLength": 60}}, "required": ["url"]}}}]


@dataclass(frozen=True, slots=True)
class StructuredConfig:
    """`model` None: the bench's Qwen3-0.6B-shape folder."""

    model: str | None = None
    prompt_tokens: int = 256
    max_tokens: int = 96
    rounds: int = 5
    out: str = "bench-out/structured.json"
    command: str = ""

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.max_tokens < 8 or self.rounds < 1:
            raise ValueError("--prompt-tokens >= 1, --max-tokens >= 8 and --rounds >= 1, please")


def _grammars() -> dict[str, str]:
    from kvcellar.chat.grammar import json_grammar, tool_call_grammar
    from kvcellar.chat.tools import parse_tools

    return {"json-schema": json_grammar(SCHEMA), "tool-call": tool_call_grammar(parse_tools(TOOLS), None, parallel=False)}


def _per_token_ms(result: object) -> float:
    timings = result.timings
    return 1000 * timings.decode_s / max(timings.num_decode_tokens, 1)


def _grammar_ms(engine: object, grammar: str, tokens: tuple[int, ...]) -> float:
    """The mask of every step and each token's acceptance, replayed through a fresh matcher: ms per token."""
    import torch

    constraint = engine.grammars.matcher(grammar)
    logits = torch.zeros(engine.grammars.num_scores)
    began = time.perf_counter()
    for token in tokens:
        if constraint.finished:
            break
        constraint.mask(logits)
        constraint.accept(token)
    return 1000 * (time.perf_counter() - began) / max(len(tokens), 1)


def run(config: StructuredConfig) -> dict:
    from kvcellar import Engine
    from kvcellar.bench.runner import bench_model_dir

    model = config.model or str(bench_model_dir())
    grammars = _grammars()
    prompt = make_ids(config.prompt_tokens, "structured", 8000)
    rows: dict[str, list[dict]] = {"free": [], **{kind: [] for kind in grammars}}
    with Engine.load(model) as engine:
        compile_ms = {}
        for kind, grammar in grammars.items():
            began = time.perf_counter()
            engine.grammars.check(grammar, kind)
            first = time.perf_counter() - began
            began = time.perf_counter()
            engine.grammars.check(grammar, kind)
            compile_ms[kind] = {"first_ms": 1000 * first, "cached_ms": 1000 * (time.perf_counter() - began)}
        engine.generate(prompt_ids=prompt, max_tokens=4)  # warm-up
        for index in range(config.rounds):
            kinds = list(grammars)[index % len(grammars):] + list(grammars)[: index % len(grammars)]
            for kind in kinds:
                engine.clear_cache()
                result = engine.generate(prompt_ids=prompt, max_tokens=config.max_tokens, grammar=grammars[kind])
                rows[kind].append({"tokens": len(result.token_ids), "ms_per_token": _per_token_ms(result),
                                   "grammar_ms_per_token": _grammar_ms(engine, grammars[kind], result.token_ids)})
                engine.clear_cache()
                free = engine.generate(prompt_ids=prompt, max_tokens=len(result.token_ids), ignore_eos=True)
                rows["free"].append({"tokens": len(free.token_ids), "ms_per_token": _per_token_ms(free)})
            log(f"round {index + 1}/{config.rounds} done")
    summary = {kind: {"median_ms_per_token": statistics.median(r["ms_per_token"] for r in runs),
                      "median_tokens": statistics.median(r["tokens"] for r in runs),
                      **({"median_grammar_ms_per_token": statistics.median(r["grammar_ms_per_token"] for r in runs)}
                         if kind != "free" else {})}
               for kind, runs in rows.items()}  # fmt: skip
    free_ms = summary["free"]["median_ms_per_token"]
    table = []
    for kind, figures in summary.items():
        grammar = figures.get("median_grammar_ms_per_token")
        table.append([kind, f"{figures['median_tokens']:.0f}", f"{figures['median_ms_per_token']:.1f}",
                      f"{figures['median_ms_per_token'] / free_ms:.3f}x", "" if grammar is None else f"{grammar:.3f}"])
    header = ["request", "tokens (median)", "decode ms/token", "x free", "grammar ms/token"]
    print("\n".join(section("Constrained decoding: cost per generated token", header, table)))
    result = {"command": config.command, "model": model, "hardware": hardware(), "rounds": rows, "summary": summary,
              "compile_ms": compile_ms, "config": {"prompt_tokens": config.prompt_tokens, "max_tokens": config.max_tokens}}
    path = Path(config.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    log(f"wrote {path}")
    return result
