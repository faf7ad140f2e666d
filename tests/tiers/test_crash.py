"""kill -9 at random moments while a process writes: after every restart, a consistent index and 0 corrupt hits."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvcellar.tiers.disk.state import INDEX_SLACK_BYTES

from .helpers import check_consistent, open_tier

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "src"
NUM_TRIALS = 50
# About 25 entries' files beside the index's share (tiers/disk/state.py): the workers churn through evictions as well as writes.
BUDGET = 40_000 + 64 * 1024 + INDEX_SLACK_BYTES


@pytest.mark.slow
def test_kill_9_during_writes_leaves_a_consistent_cache(tmp_path):
    folder = tmp_path / "kv"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(HERE), os.environ.get("PYTHONPATH", "")])}
    rng = random.Random(20261123)
    repaired = 0
    for trial in range(NUM_TRIALS):
        worker = subprocess.Popen(
            [sys.executable, str(HERE / "crash_worker.py"), str(folder), str(trial), str(BUDGET)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
        )  # fmt: skip
        line = worker.stdout.readline().strip()
        if line != "ready":
            worker.kill()
            pytest.fail(f"worker did not start: {worker.stderr.read()[-2000:]}")
        time.sleep(rng.uniform(0.0, 0.25))
        worker.kill()  # SIGKILL: no flush, no atexit, possibly mid-write or mid-commit
        worker.wait()
        worker.stdout.close()
        worker.stderr.close()

        tier = open_tier(folder, budget_bytes=BUDGET)  # restart: reconcile, then check everything
        counters = tier.stats().counters
        repaired += counters["num_temp_removed"] + counters["num_orphans_indexed"] + counters["num_missing_dropped"]
        check_consistent(tier)  # rows == files == catalog, no temp file, every entry loads its own bytes
        assert tier.num_bytes <= BUDGET
        assert tier.stats().counters["num_corrupt"] == 0
        tier.close()
    print(f"recovery actions over {NUM_TRIALS} restarts: {repaired}")
    assert repaired > 0, "no kill landed inside a write: the test did not exercise recovery"
