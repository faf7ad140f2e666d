"""A server started over a damaged disk index rebuilds it from the entry files and answers as a cache-off server."""

from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path

import pytest

from .support import long_text


def _stop_draining(process) -> None:
    """SIGINT: a graceful stop that finishes the queued disk writes before the process exits."""
    process.process.send_signal(signal.SIGINT)
    process.process.wait(120)  # its exit status is not what this test checks


def _garbage_over_pages(index: Path) -> None:
    data = bytearray(index.read_bytes())
    data[4096:] = os.urandom(len(data) - 4096)
    index.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["not a database", "malformed", "bad token row"])
def test_a_server_over_a_damaged_index_serves_like_a_cache_off_server(start_server, tmp_path, unique, damage):
    cache_dir = tmp_path / "kv-cache"
    messages = [{"role": "system", "content": long_text(f"system {unique}", 40)},
                {"role": "user", "content": long_text("a question", 20)}]  # fmt: skip
    first = start_server("--cache-dir", str(cache_dir))
    written = first.client().chat.completions.create(model=first.model, messages=messages, max_tokens=8, temperature=0)
    _stop_draining(first)
    files = sorted((cache_dir / "entries-v1").rglob("*.safetensors"))
    assert files, "the first server wrote no entry file"
    index = cache_dir / "index.sqlite3"
    if damage == "not a database":
        index.write_bytes(os.urandom(index.stat().st_size))
    elif damage == "malformed":
        _garbage_over_pages(index)
    else:
        db = sqlite3.connect(index)
        db.execute("UPDATE tokens SET token_ids = x'010203'")  # every row: not a whole number of token ids
        db.commit()
        db.close()

    second = start_server("--cache-dir", str(cache_dir))
    cache_off = start_server("--no-cache")
    restored = second.client().chat.completions.create(model=second.model, messages=messages, max_tokens=8, temperature=0)
    baseline = cache_off.client().chat.completions.create(model=cache_off.model, messages=messages, max_tokens=8,
                                                          temperature=0)  # fmt: skip
    assert restored.choices[0].message.content == baseline.choices[0].message.content == written.choices[0].message.content
    details = restored.usage.prompt_tokens_details
    assert details.model_extra["cached_tokens_by_tier"].get("disk", 0) > 0  # the entries came back from their files
    assert ("num_bad_rows_at_open" if damage == "bad token row" else "rebuilding it from the entry files") in second.log_text()
    _stop_draining(second)
    cache_off.stop()
