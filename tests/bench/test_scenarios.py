"""Scenario prompts: seeded, reproducible, shaped as documented (no model needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvcellar.bench.config import BenchConfig, format_length, parse_lengths
from kvcellar.bench.scenarios import SCENARIOS, build_requests, cold_label, make_ids
from .support import BLOCK, LENGTHS, TINY_SIZES, tiny_config

HI = 2000


@pytest.fixture
def config(tmp_path) -> BenchConfig:
    return tiny_config(Path("unused-model"), tmp_path)


def test_prompts_are_reproducible_and_seeded(config):
    for kind in SCENARIOS:
        assert build_requests(kind, config, HI) == build_requests(kind, config, HI)
    other = BenchConfig.from_json(config.to_json() | {"seed": 1})
    assert build_requests("prefix", other, HI)[0].ids != build_requests("prefix", config, HI)[0].ids
    assert make_ids(2048, 2048, 8000)[:3] == make_ids(2048, 2048, 8000)[:3]
    assert all(100 <= t < HI for r in build_requests("chat", config, HI) for t in r.ids)


def test_prefix_rows_cold_exact_nearest(config):
    requests = build_requests("prefix", config, HI)
    assert len(requests) == 3 * TINY_SIZES.repeats * len(LENGTHS)
    cold, exact, nearest = requests[:3]
    assert (cold.label, exact.label, nearest.label) == ("cold@64", "exact@64", "nearest@64")
    assert cold.ids == exact.ids and len(nearest.ids) == 64
    diverge = 64 - BLOCK // 2  # inside the last block [48, 64)
    assert nearest.ids[:diverge] == cold.ids[:diverge] and nearest.ids[diverge] != cold.ids[diverge]
    assert len({r.ids for r in requests if r.kind == "cold"}) == TINY_SIZES.repeats * len(LENGTHS)
    assert [r.ids for r in build_requests("restart", config, HI)] == [r.ids for r in requests if r.kind == "cold"]


def test_chat_is_round_robin_and_grows(config):
    s = TINY_SIZES
    requests = build_requests("chat", config, HI)
    assert len(requests) == s.chat_conversations * s.chat_turns
    first, second = requests[0], requests[1]  # turn 1 of conversations 1 and 2: the same system prompt
    assert first.ids[: s.chat_system_tokens] == second.ids[: s.chat_system_tokens]
    assert first.ids != second.ids
    turn2 = requests[s.chat_conversations]  # turn 2 of conversation 1 extends its turn 1 by a reply and a message
    assert turn2.ids[: len(first.ids)] == first.ids
    assert len(turn2.ids) == len(first.ids) + s.chat_assistant_tokens + s.chat_user_tokens


def test_documents_and_agent(config):
    s = TINY_SIZES
    docs = build_requests("doc-qa", config, HI)
    assert len(docs) == s.doc_documents * s.doc_questions
    assert docs[0].ids[: s.doc_tokens] == docs[s.doc_documents].ids[: s.doc_tokens] != docs[1].ids[: s.doc_tokens]
    steps = build_requests("agent", config, HI)
    assert [len(r.ids) for r in steps] == [s.agent_system_tokens + k * (s.agent_call_tokens + s.agent_output_tokens)
                                           for k in range(s.agent_steps)]  # fmt: skip
    assert all(b.ids[: len(a.ids)] == a.ids for a, b in zip(steps, steps[1:]))


def test_labels_lengths_and_validation(tmp_path):
    assert parse_lengths("2048, 8K,32k") == (2048, 8192, 32768)
    assert [format_length(n) for n in (512, 2048, 32768)] == ["512", "2K", "32K"]
    assert cold_label("restart@2K") == "cold@2K" and cold_label("chat") == "chat"
    with pytest.raises(ValueError, match="two blocks"):
        tiny_config(Path("m"), tmp_path, lengths=(16,))
    with pytest.raises(ValueError, match="exactly one target"):
        BenchConfig(out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="cannot read"):
        parse_lengths("2x")


def test_default_lengths_keep_two_blocks_per_prompt():
    from kvcellar.bench import default_lengths

    assert default_lengths(512, quick=True) == (1024, 2048)  # the CPU default block
    assert default_lengths(512, quick=False) == (2048, 8192)
    assert default_lengths(2048, quick=False) == (8192, 32768)  # the CUDA default block
    assert default_lengths(2048, quick=True) == (4096, 8192)  # none of the quick ones holds two blocks
