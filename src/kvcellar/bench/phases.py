"""Benchmark phases: one mode (a cache configuration or a baseline) running its scenarios.

Operations: `MODES` (name -> mode strategy), `IN_PROCESS_MODES`,
`HTTP_MODES`, `BASELINE_MODE`, `count_requests(config, mode)`,
`run_phase(spec, on_sample) -> dict`, and `main([SPEC.json, OUT.json,
PARENT_PID])` (what runner.py starts in a fresh process for each phase, so
that its memory peak is its own; it reports each request on stdout).

A mode opens a target (`open(config, spec) -> Opened`), which may say why it
is skipped (a tier the engine does not have). Modes that force one tier
empty every faster tier before each request (its entries demote down) and
wait for pending disk writes, so each hit is read from that tier alone.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kvcellar.bench.config import BenchConfig
from kvcellar.bench.hardware import Usage, memory_report
from kvcellar.bench.scenarios import AGENT, CHAT, DOC_QA, PREFIX, RESTART, build_requests, make_ids

WORKLOADS = (PREFIX, CHAT, DOC_QA, AGENT)


def wanted_scenarios(config: BenchConfig, scenarios: tuple[str, ...]) -> list[str]:
    """The scenarios of a mode that this run asked for (restart comes with prefix)."""
    return [kind for kind in scenarios if config.scenarios is None or kind in config.scenarios
            or (kind == RESTART and PREFIX in config.scenarios)]  # fmt: skip


def warm_up_ids(config: BenchConfig, scenarios: tuple[str, ...]) -> list[int]:
    """Token ids of the request each phase sends before its measured ones (under its own cache salt).

    As long as the longest prefix-scenario prompt: a process's first request of a length pays one-time
    costs (allocator growth, first-touch pages, on CUDA kernel loading), which a server pays once, not
    per request.
    """
    wanted = wanted_scenarios(config, scenarios)
    longest = max(config.lengths) if PREFIX in wanted or RESTART in wanted else min(config.block_size, 256)
    return make_ids(longest, "warm-up", 1000)


@dataclass
class Opened:
    target: object | None = None
    skipped: str | None = None
    hi: int = 0  # token ids are drawn from [100, hi)
    device: object = None
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EngineMode:
    """A kvcellar Engine with a cache configuration derived from the run's."""

    name: str
    description: str
    scenarios: tuple[str, ...]
    adjust: Callable[[object], dict] = lambda cache: {}  # CacheConfig -> fields to replace
    cache_subdir: str | None = None  # disk tier folder under the run's cache folder
    needs_tier: str | None = None
    forced_tier: str | None = None

    def open(self, config: BenchConfig, spec: dict) -> Opened:
        from kvcellar.bench.targets import EngineTarget
        from kvcellar.engine import Engine

        cache = config.engine.cache
        changes = self.adjust(cache)
        if self.cache_subdir is not None:
            changes["cache_dir"] = str(Path(spec["cache_dir"]) / self.cache_subdir)
        engine = Engine(dataclasses.replace(config.engine, cache=dataclasses.replace(cache, **changes)))
        info = {"tiers": engine.tier_names, "cache_dir": changes.get("cache_dir"), **_where(engine.loaded),
                "prefill_chunk_size": engine.config.prefill_chunk_size,
                "prefill_schedule": engine.config.prefill_schedule}  # fmt: skip
        if self.needs_tier is not None and self.needs_tier not in engine.tier_names:
            EngineTarget(engine, 1).close()
            why = {"disk": "a disk tier needs a cache folder and an engine built with it",
                   "host": "a host tier exists only beside a GPU"}.get(self.needs_tier, "")  # fmt: skip
            tiers = ", ".join(engine.tier_names) or "none"
            return Opened(skipped=f"this engine has no {self.needs_tier} tier (tiers: {tiers}; {why})", info=info)
        loaded = engine.loaded
        warm = warm_up_ids(config, self.scenarios)
        engine.generate(prompt_ids=warm, max_tokens=1, cache_salt=f"bench-{spec['run_id']}-warm-up")  # pages weights in
        engine.cache_registry.flush()  # its disk writes must not land in the measured requests
        prepare = _forcer(engine, self.forced_tier) if self.forced_tier else None
        hi = min(config.max_token_id, len(loaded.tokenizer))
        return Opened(EngineTarget(engine, config.max_tokens, prepare), hi=hi, device=loaded.device, info=info)


def _where(loaded: object) -> dict:
    return {"device": str(loaded.device), "dtype": loaded.precision}


def _forcer(engine: object, tier: str) -> Callable[[], None]:
    """Before each request: every faster tier's budget to 0 and back (its entries demote down to `tier`).

    Clearing would drop them instead: a host tier only receives what the device tier evicts.
    """
    faster = engine.tier_names[: engine.tier_names.index(tier)] if tier in engine.tier_names else []
    budgets = {name: engine.cache_stats()["tiers"][name]["budget_bytes"] for name in faster}
    flush = getattr(engine, "flush_cache", None) or getattr(engine.cache_registry, "flush", None)

    def prepare() -> None:
        for name in faster:
            engine.set_cache_budget(name, 0)
            engine.set_cache_budget(name, budgets[name])
        if flush is not None:
            flush()  # pending disk writes land in files: the hit below reads them

    return prepare


@dataclass(frozen=True)
class HandWrittenMode:
    name: str
    description: str
    scenarios: tuple[str, ...]

    def open(self, config: BenchConfig, spec: dict) -> Opened:
        import torch

        from kvcellar.bench.handwritten import HandWrittenTarget
        from kvcellar.engine.loader import load_model

        engine = config.engine
        if engine.num_threads is not None:
            torch.set_num_threads(engine.num_threads)
        loaded = load_model(engine.model, engine.device, engine.dtype)
        with torch.inference_mode():  # warm-up: pages the weights in
            warm = torch.tensor([warm_up_ids(config, self.scenarios)], device=loaded.device)
            loaded.model(input_ids=warm, use_cache=False, logits_to_keep=1)
        target = HandWrittenTarget(loaded, config.max_tokens, engine.cache.device_cache_bytes)
        hi = min(config.max_token_id, len(loaded.tokenizer))
        return Opened(target, hi=hi, device=loaded.device, info=_where(loaded))


@dataclass(frozen=True)
class HttpMode:
    name: str
    description: str
    scenarios: tuple[str, ...]
    unique_salts: bool = False  # a fresh cache namespace per request: nothing is ever reused

    def open(self, config: BenchConfig, spec: dict) -> Opened:
        from kvcellar.bench.targets import HttpTarget

        target = HttpTarget(config.url, config.max_tokens, config.api_key)
        info = target.describe()
        warm = warm_up_ids(config, self.scenarios)
        from kvcellar.bench.scenarios import BenchRequest

        target.send(BenchRequest("warm-up", tuple(warm), "warm-up", "warm-up"), f"bench-{spec['run_id']}-warm-up")
        return Opened(target, hi=config.max_token_id, info=info)


MODES = {mode.name: mode for mode in (
    EngineMode("no-cache", "cache off: every prompt is prefilled in full (block-aligned chunks)", WORKLOADS,
               adjust=lambda cache: {"enabled": False}),
    EngineMode("kvcellar", "the cache as configured: device tier, host tier on a GPU, disk tier in a cache folder",
               WORKLOADS, cache_subdir="kvcellar"),
    EngineMode("after-restart", "a new engine process on kvcellar's cache folder: the prefix prompts again, from disk",
               (RESTART,), cache_subdir="kvcellar", needs_tier="disk"),
    HandWrittenMode("hf-deepcopy", "by hand with transformers: deepcopy a kept DynamicCache, one forward of the rest",
                    WORKLOADS),
    EngineMode("device-only", "the device tier alone (no host, no disk)", (PREFIX,),
               adjust=lambda cache: {"cache_dir": None, "use_host_tier": False, "use_disk_tier": False}),
    EngineMode("host-only", "hits from the pinned host tier alone (device emptied before each request)", (PREFIX,),
               adjust=lambda cache: {"cache_dir": None, "use_disk_tier": False}, needs_tier="host", forced_tier="host"),
    EngineMode("disk-only", "hits from the disk tier alone (faster tiers emptied, writes flushed before each request)",
               (PREFIX,), adjust=lambda cache: {"use_host_tier": False}, cache_subdir="disk-only", needs_tier="disk",
               forced_tier="disk"),
    HttpMode("http-no-reuse", "the server, a fresh cache salt per request (cold, with capture)", WORKLOADS, True),
    HttpMode("http", "the server, one cache salt per scenario", WORKLOADS),
)}  # fmt: skip
IN_PROCESS_MODES = ("no-cache", "kvcellar", "after-restart", "hf-deepcopy", "device-only", "host-only", "disk-only")
HTTP_MODES = ("http-no-reuse", "http")
BASELINE_MODE = {"in-process": "no-cache", "http": "http-no-reuse"}


def count_requests(config: BenchConfig, mode_name: str) -> int:
    """How many measured requests the phase of `mode_name` sends (for the run's progress bar)."""
    mode = MODES[mode_name]
    return sum(len(build_requests(kind, config, config.max_token_id)) for kind in wanted_scenarios(config, mode.scenarios))


def run_phase(spec: dict, on_sample: Callable[[dict], None] = lambda sample: None) -> dict:
    """Run one mode's scenarios; spec = {mode, config, run_id, cache_dir}. JSON-ready result.

    `on_sample(sample)` is called after each measured request (the bench's progress).
    """
    config = BenchConfig.from_json(spec["config"])
    mode = MODES[spec["mode"]]
    usage = Usage.start()
    out = {"mode": mode.name, "description": mode.description, "skipped": None, "samples": [], "info": {}}
    opened = mode.open(config, spec)
    out["info"] = opened.info
    if opened.skipped is not None:
        out["skipped"] = opened.skipped
        return out | {"usage": usage.finish()}
    out["memory_after_load"] = memory_report(opened.device)
    requests = [r for kind in wanted_scenarios(config, mode.scenarios) for r in build_requests(kind, config, opened.hi)]
    try:
        for index, request in enumerate(requests):
            salt = f"bench-{spec['run_id']}-{request.salt_key}" + (f"-{index}" if getattr(mode, "unique_salts", False) else "")
            sample = dataclasses.asdict(opened.target.send(request, salt))
            out["samples"].append(sample)
            on_sample(sample)
        if hasattr(opened.target, "engine"):
            out["cache_stats"] = opened.target.engine.cache_stats()
    finally:
        opened.target.close()  # an engine left open can abort the process at exit
    out["memory"] = memory_report(opened.device)
    return out | {"usage": usage.finish()}


PROGRESS_PREFIX = "kvcellar-bench-sample "  # a phase process's stdout line per measured request


def main(argv: list[str]) -> int:
    """In a phase process: SPEC.json OUT.json PARENT_PID; one PROGRESS_PREFIX line per request on stdout."""
    from kvcellar.bench.children import end_with_parent

    spec_path, out_path, parent_pid = argv
    end_with_parent(int(parent_pid))

    def report(sample: dict) -> None:
        brief = {key: sample.get(key) for key in ("label", "ttft_s", "num_cached_tokens")}
        print(PROGRESS_PREFIX + json.dumps(brief), flush=True)

    result = run_phase(json.loads(Path(spec_path).read_text()), report)
    Path(out_path).write_text(json.dumps(result))
    return 0
