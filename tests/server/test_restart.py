"""After a server restart the same conversation is restored from the disk tier.

Runs once `kvcellar serve` has --cache-dir (the disk tier); until then it is
skipped with that reason.
"""

from __future__ import annotations

import argparse

import pytest

from .support import long_text


def _serve_has_cache_dir() -> bool:
    from kvcellar.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return "--cache-dir" in commands.choices["serve"]._option_string_actions


@pytest.mark.skipif(not _serve_has_cache_dir(), reason="needs the disk tier (kvcellar serve --cache-dir)")
def test_after_a_restart_the_same_conversation_hits_the_disk_tier(start_server, tmp_path, unique):
    cache_dir = str(tmp_path / "kv-cache")
    messages = [{"role": "system", "content": long_text(f"system {unique}", 30)},
                {"role": "user", "content": long_text("first question", 30)}]  # fmt: skip
    # --no-cost-model: every hit is restored, whatever the measured rates say (they depend on the
    # machine's load; a tail cheaper to recompute than to read would make this test depend on timing).
    first = start_server("--cache-dir", cache_dir, "--no-cost-model")
    client = first.client()
    reply = client.chat.completions.create(model=first.model, messages=messages, max_tokens=8, temperature=0)
    messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                 {"role": "user", "content": long_text("second question", 30)}]  # fmt: skip
    before = client.chat.completions.create(model=first.model, messages=messages, max_tokens=8, temperature=0)
    first.stop()  # SIGTERM: uvicorn drains, then the engine closes and its disk writes finish

    second = start_server("--cache-dir", cache_dir, "--no-cost-model")
    probe = second.post("/v1/cache/probe", {"messages": messages}).json()
    assert probe["cached_tokens_by_tier"].get("disk", 0) > 0, probe
    after = second.client().chat.completions.create(model=second.model, messages=messages, max_tokens=8, temperature=0)
    details = after.usage.prompt_tokens_details
    assert details.cached_tokens >= after.usage.prompt_tokens // 16 * 16 > 0
    assert details.model_extra["cached_tokens_by_tier"].get("disk", 0) > 0
    assert after.choices[0].message.content == before.choices[0].message.content  # exact mode: same greedy answer
    second.stop()
