"""A graceful stop (SIGTERM, SIGINT, SIGHUP) drains the disk tier's write-behind queue and exits 0.

"Accepted" is read from the server itself: the disk tier's visible entries
(written or still queued) in /v1/cache/stats after the burst's last answer.
Every one of them must be in the index (so durable, its file fsynced first)
once the process has exited; nothing here depends on how fast the writer is.
"""

from __future__ import annotations

import concurrent.futures
import re
import signal

import pytest

from kvcellar.tiers.disk.admin import disk_cache_stats

from .support import long_text

NUM_PROMPTS = 6


def _disk_tier(server) -> dict:
    return server.get("/v1/cache/stats").json()["tiers"]["disk"]


def _burst(server, tag: str) -> None:
    client = server.client()

    def ask(i: int) -> None:
        client.completions.create(model=server.model, prompt=long_text(f"{tag} prompt {i}", 220), max_tokens=2,
                                  temperature=0)  # fmt: skip

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        list(pool.map(ask, range(NUM_PROMPTS)))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_right_after_a_burst_leaves_every_accepted_entry_on_disk(start_server, tmp_path, unique, sig):
    cache_dir = tmp_path / "kv"
    server = start_server("--cache-dir", str(cache_dir))
    _burst(server, f"{unique} {sig.name}")
    accepted = _disk_tier(server)["entries"]
    assert accepted >= NUM_PROMPTS  # each prompt has several whole 16-token blocks
    server.process.send_signal(sig)
    assert server.process.wait(300) == 0, server.log_tail()

    found = disk_cache_stats(cache_dir)
    assert found["num_entries"] >= accepted, (found, server.log_tail())
    drained = re.search(r"drained the disk tier: (\d+) written, (\d+) dropped", server.log_text())
    assert drained is not None, server.log_tail()
    assert int(drained.group(2)) == 0
