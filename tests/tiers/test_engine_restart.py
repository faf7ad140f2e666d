"""The disk tier inside the engine: after a restart in a new process, the prompt comes from disk
and exact-mode output is bit-identical to a run without any cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvcellar import CacheConfig, Engine

SRC = str(Path(__file__).resolve().parents[2] / "src")
PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n" * 2
CHILD = """
import json, sys
from kvcellar import CacheConfig, Engine
model, cache_dir, prompt = sys.argv[1:4]
# cost_model=False: this test checks what a restore restores; timing must not decide whether it runs.
engine = Engine.load(model, block_size=16, cache=CacheConfig(exact=True, cache_dir=cache_dir, cost_model=False))
result = engine.generate(prompt, max_tokens=8)
disk = engine.cache_registry.stats()[0].tiers["disk"].counters
engine.close()
engine.cache_registry.close()
print(json.dumps({"tokens": list(result.token_ids), "by_tier": result.cached_tokens_by_tier,
                  "cached": result.num_cached_tokens, "prompt": result.num_prompt_tokens,
                  "loads": disk.get("num_loads", 0), "corrupt": disk.get("num_corrupt", 0)}))
"""


def _run_child(model: str, cache_dir: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, model, str(cache_dir), PROMPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_5"])
def test_new_process_restores_from_disk_bit_identically(tiny_model_dirs, tmp_path, arch):
    model = str(tiny_model_dirs[arch])
    cache_dir = tmp_path / "kv"
    cold = Engine.load(model, block_size=16, cache=CacheConfig(enabled=False))
    expected = cold.generate(PROMPT, max_tokens=8)
    cold.close()

    engine = Engine.load(model, block_size=16, cache=CacheConfig(exact=True, cache_dir=str(cache_dir)))
    first = engine.generate(PROMPT, max_tokens=8)
    engine.close()
    engine.cache_registry.close()  # flushes the write-behind queue
    assert first.num_cached_tokens == 0 and first.token_ids == expected.token_ids

    warm = _run_child(model, cache_dir)
    # The whole prompt was cached with its next-token logits (a 'tail' entry): nothing is recomputed.
    assert warm["cached"] == warm["prompt"] == expected.num_prompt_tokens
    assert warm["by_tier"] == {"disk": warm["prompt"]}
    # One block timed at start-up (kv/wiring.prime_load_rates), then the blocks and the tail.
    assert warm["loads"] == 1 + warm["prompt"] // 16 + 1 and warm["corrupt"] == 0
    assert warm["tokens"] == list(expected.token_ids)


def test_an_engine_started_on_a_filled_folder_has_measured_the_disk_before_its_first_hit(tiny_model_dirs, tmp_path):
    model, cache_dir = str(tiny_model_dirs["qwen3"]), str(tmp_path / "kv")
    engine = Engine.load(model, block_size=16, cache=CacheConfig(cache_dir=cache_dir))
    assert "disk" not in engine.prefix_cache.cost_model.snapshot()["load_bytes_per_s"]  # an empty folder: nothing to time
    engine.generate(PROMPT, max_tokens=1)
    engine.close()
    restarted = Engine.load(model, block_size=16, cache=CacheConfig(cache_dir=cache_dir))
    try:
        assert restarted.prefix_cache.cost_model.snapshot()["load_bytes_per_s"]["disk"] > 0
        assert restarted.cache_stats()["tiers"]["disk"]["num_loads"] == 1  # one stored block, timed at start-up
    finally:
        restarted.close()


def test_the_worker_times_one_block_of_prefill_at_start_when_a_slower_tier_exists(tiny_model_dirs, tmp_path):
    import time

    model = str(tiny_model_dirs["qwen3"])
    with_disk = Engine.load(model, block_size=16, cache=CacheConfig(cache_dir=str(tmp_path / "kv")))
    device_only = Engine.load(model, block_size=16, cache=CacheConfig())
    try:
        deadline = time.monotonic() + 30
        while with_disk.prefix_cache.cost_model.snapshot()["prefill_tokens_per_s"] is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert with_disk.prefix_cache.cost_model.snapshot()["prefill_tokens_per_s"] > 0
        assert with_disk.cache_stats()["entries"] == 0  # the timed prefill stored nothing
        device_only.generate(PROMPT[:10], max_tokens=1)  # runs after the worker's start-up step
        assert device_only.prefix_cache.cost_model.snapshot()["prefill_tokens_per_s"] is None  # nothing to weigh
    finally:
        with_disk.close()
        device_only.close()
