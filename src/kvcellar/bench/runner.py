"""Run a whole benchmark: plan the modes, run each as a phase, summarise, write the files.

Operations: `bench_model_dir()` (the Qwen3-0.6B-shape folder, made once),
`plan_modes(config)`, `unavailable_modes(config)`, `run_bench(config) -> results` (writes results.json,
results.md and the PNGs into `config.out_dir`).

Each phase runs in a fresh Python process (`phases.main`)
unless `config.isolate` is False: memory peaks do not mix, and the
after-restart phase really is a new process opening the kvcellar phase's
cache folder. A phase that fails is recorded as skipped with its exit code;
the others still run.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from kvcellar.bench.config import BenchConfig
from kvcellar.bench.hardware import Usage, hardware
from kvcellar.bench.children import child_env, run_child, stop_signals_interrupt
from kvcellar.bench.phases import (BASELINE_MODE, HTTP_MODES, IN_PROCESS_MODES, MODES, PROGRESS_PREFIX, count_requests,
                                   run_phase)  # fmt: skip
from kvcellar.bench.progress import RunProgress, log
from kvcellar.bench.report import markdown, ttft_matrix, write_json
from kvcellar.bench.scenarios import SCENARIOS
from kvcellar.bench.summary import check_consistency, summarise
from kvcellar.errors import KvcellarError

BENCH_MODEL = "bench-qwen3-0.6b"
# Phases that read what an earlier phase left in the cache folder.
NEEDS_EARLIER = {"after-restart": "kvcellar"}
_CHILD = "import sys; from kvcellar.bench.phases import main; sys.exit(main(sys.argv[1:]))"


def bench_model_dir(progress: Callable[[str], None] | None = log) -> Path:
    """`$KVCELLAR_HOME/models/bench-qwen3-0.6b` (random Qwen3-0.6B-shape weights), made on first use."""
    from kvcellar.models.demo import kvcellar_home
    from kvcellar.models.factory import ensure_model

    return ensure_model("qwen3", "0.6b", kvcellar_home() / "models" / BENCH_MODEL, progress=progress)


def _cuda_wanted(config: BenchConfig) -> bool:
    from kvcellar.engine.loader import device_type

    return device_type(config.engine.device) == "cuda"


def unavailable_modes(config: BenchConfig) -> dict[str, str]:
    """Modes this target cannot run, with the reason (shown as skipped phases)."""
    if config.url is not None:
        reason = "runs in-process only: a client cannot restart, force the tiers of, or bypass a server"
        return {mode: reason for mode in IN_PROCESS_MODES}
    if not _cuda_wanted(config):
        return {"host-only": "a host tier exists only beside a GPU (device is not CUDA)"}
    return {}


def plan_modes(config: BenchConfig) -> list[str]:
    """The modes to run, in order; ValueError for a mode that does not fit the target."""
    unavailable = unavailable_modes(config)
    candidates = [m for m in (HTTP_MODES if config.url else IN_PROCESS_MODES) if m not in unavailable]
    if config.scenarios is not None:
        unknown = [s for s in config.scenarios if s not in SCENARIOS]
        if unknown:
            raise ValueError(f"unknown scenario(s) {', '.join(unknown)}: choose from {', '.join(SCENARIOS)}")
        if "restart" in config.scenarios and "prefix" not in config.scenarios:
            raise ValueError("the restart scenario re-sends the prefix prompts after a restart: add prefix to --scenarios")
    if config.modes is None:
        return candidates
    unknown = [m for m in config.modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {', '.join(unknown)}: choose from {', '.join(MODES)}")
    misfit = [f"{m} ({unavailable.get(m, 'needs --url')})" for m in config.modes if m not in candidates]
    if misfit:
        raise ValueError(f"mode(s) {', '.join(misfit)} do not apply here; choose from {', '.join(candidates)}")
    return [m for m in candidates if m in config.modes]


def _failed_phase(mode_name: str, reason: str) -> dict:
    mode = MODES[mode_name]
    return {"mode": mode.name, "description": mode.description, "samples": [], "info": {}, "skipped": reason}


def _run_isolated(spec: dict, on_sample: Callable[[dict], None]) -> dict:
    with tempfile.TemporaryDirectory(prefix="kvcellar-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "phase.json"
        spec_path.write_text(json.dumps(spec))

        def relay(line: str) -> None:
            if line.startswith(PROGRESS_PREFIX):
                on_sample(json.loads(line.removeprefix(PROGRESS_PREFIX)))
            else:  # the phase's own prints stay visible
                print(line, flush=True)

        command = [sys.executable, "-c", _CHILD, str(spec_path), str(out_path), str(os.getpid())]
        code = run_child(command, child_env(), relay)
        if code != 0 or not out_path.exists():
            return _failed_phase(spec["mode"], f"the phase's process failed (exit code {code}; its error is above)")
        return json.loads(out_path.read_text())


def _run_phases(config: BenchConfig, modes: list[str], cache_base: Path, run_id: str, phases: list[dict],
                on_phase: Callable[[], None]) -> None:  # fmt: skip
    """Run `modes` in order, appending each phase's result to `phases` and calling `on_phase()` after it."""
    progress = RunProgress({mode: count_requests(config, mode) for mode in modes})
    try:
        for number, mode in enumerate(modes, 1):
            progress.phase(mode)
            needed = NEEDS_EARLIER.get(mode)
            earlier = next((p for p in phases if p["mode"] == needed), None)
            if needed is not None and (earlier is None or earlier.get("skipped") or "disk" not in earlier["info"].get("tiers", [])):
                phases.append(_failed_phase(mode, f"needs the {needed} phase to have filled a disk tier first"))
                log(f"phase {number}/{len(modes)} {mode}: skipped ({phases[-1]['skipped']})")
            else:
                log(f"phase {number}/{len(modes)} {mode}: {MODES[mode].description}"
                     + (" (fresh process)" if config.isolate else ""))  # fmt: skip
                spec = {"mode": mode, "config": config.to_json(), "run_id": run_id, "cache_dir": str(cache_base)}
                phase = _run_isolated(spec, progress.sample) if config.isolate else run_phase(spec, progress.sample)
                if phase.get("skipped"):
                    log(f"phase {mode}: skipped: {phase['skipped']}")
                else:
                    usage = phase["usage"]
                    log(f"phase {mode}: {len(phase['samples'])} requests, {usage['wall_s']:.1f} s, "
                         f"CPU use {usage['cpu_util']:.2f}, peak RSS {phase['memory']['peak_rss_mib']:.0f} MiB")
                phases.append(phase)
            progress.finish_phase(mode, len(phases[-1]["samples"]))
            on_phase()
    finally:
        progress.close()


def _check_extras() -> None:
    import importlib.util

    missing = [name for name in ("matplotlib", "tqdm") if importlib.util.find_spec(name) is None]
    if missing:
        raise KvcellarError(f"kvcellar bench needs {' and '.join(missing)}: pip install 'kvcellar[bench]'")


def run_bench(config: BenchConfig) -> dict:
    """Run every planned phase and write results.json, results.md and the plots; returns the results.

    The files are rewritten after every phase, so a run stopped early (Ctrl-C, SIGTERM, SIGHUP, a crash)
    keeps what it measured, marked `"stopped_early"`; its phase process is stopped with it.
    """
    _check_extras()  # before any phase runs, not after
    started, usage = time.perf_counter(), Usage.start()
    modes = plan_modes(config)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_base = Path(config.cache_dir) if config.cache_dir else out_dir / "cache"
    created = [cache_base / name for name in ("kvcellar", "disk-only") if not (cache_base / name).exists()]
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    hw = hardware(config.engine.device if config.engine else "cpu")
    log(f"kvcellar bench: {len(modes)} phases ({', '.join(modes)}) -> {out_dir}")
    phases: list[dict] = []
    facts = {"config": config, "run_id": run_id, "hardware": hw, "started": started, "usage": usage}
    partial = lambda reason: _write(_results(phases, stopped_early=reason, **facts), out_dir)  # noqa: E731
    try:
        with stop_signals_interrupt():
            _run_phases(config, modes, cache_base, run_id, phases, lambda: partial(f"after {len(phases)} of {len(modes)} phases"))
    except BaseException as exc:
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
        partial(f"{reason} after {len(phases)} of {len(modes)} phases")
        log(f"stopped early ({reason}); the {len(phases)} finished phases are in {out_dir / 'results.json'}")
        raise
    finally:
        if not config.keep_cache:
            for folder in created:
                shutil.rmtree(folder, ignore_errors=True)
            if not config.cache_dir and cache_base.exists() and not any(cache_base.iterdir()):
                cache_base.rmdir()
    if config.modes is None:  # say what did not run, and why
        phases += [_failed_phase(mode, reason) for mode, reason in unavailable_modes(config).items()]
    results = _results(phases, stopped_early=None, **facts)
    from kvcellar.bench.plots import write_plots  # matplotlib: only the parent process needs it

    results["plots"] = write_plots(results, out_dir)
    _write(results, out_dir)
    print(ttft_matrix(results), flush=True)
    log(f"wrote {out_dir / 'results.json'}, results.md, {', '.join(results['plots'])} in {results['wall_s']:.0f} s")
    for problem in results["checks"]:
        log(f"check: {problem}")
    return results


def _results(phases: list[dict], *, config: BenchConfig, run_id: str, hardware: dict, started: float, usage: Usage,
             stopped_early: str | None) -> dict:  # fmt: skip
    kind = "http" if config.url else "in-process"
    baseline, main = BASELINE_MODE[kind], "http" if config.url else "kvcellar"
    server = next((p["info"] for p in phases if p["mode"] in HTTP_MODES and p.get("info")), {})
    model = (server.get("model") or {}).get("id") if config.url else config.engine.model
    return {
        "target": f"{kind}, {Path(str(model)).name}" + (f" at {config.url}" if config.url else ""),
        "model": model, "server": server, "run_id": run_id, "config": config.to_json(), "hardware": hardware,
        "baseline_mode": baseline, "main_mode": main, "phases": list(phases), "stopped_early": stopped_early,
        "rows": summarise(phases, baseline), "checks": check_consistency(phases, config.block_size),
        "wall_s": time.perf_counter() - started, "usage": usage.finish(),
    }  # fmt: skip


def _write(results: dict, out_dir: Path) -> None:
    write_json(results, out_dir / "results.json")
    (out_dir / "results.md").write_text(markdown(results))
