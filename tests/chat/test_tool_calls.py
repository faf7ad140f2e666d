"""Tool calls parsed out of answers (chat/tool_calls.py): whole, and streamed in pieces of every size."""

from __future__ import annotations

import json

import pytest

from kvcellar.chat.tool_calls import ToolCall, ToolCallStream, split_tool_calls

ANSWER = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>\n'
          '<tool_call>\n{"name": "get_time", "parameters": {"zone": "JST"}}\n</tool_call>')  # fmt: skip


def test_whole_answer_splits_into_content_and_calls():
    content, calls = split_tool_calls(ANSWER)
    assert content == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris", "days": 3}),
                                                                  ("get_time", {"zone": "JST"})]  # fmt: skip
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 11, len(ANSWER)])
def test_streamed_in_any_piece_size_gives_the_same_split(size):
    stream = ToolCallStream()
    pieces = []
    for start in range(0, len(ANSWER), size):
        pieces += stream.push(ANSWER[start : start + size])
    pieces += stream.flush()
    text = "".join(p for p in pieces if isinstance(p, str))
    calls = [p for p in pieces if isinstance(p, ToolCall)]
    assert text.strip() == "Let me look." and [c.name for c in calls] == ["get_weather", "get_time"]
    assert "<tool" not in text  # no piece of an opening ever went out as content


def test_a_block_that_does_not_parse_stays_content():
    content, calls = split_tool_calls("a <tool_call>\n{not json}\n</tool_call> b")
    assert calls == [] and content == "a <tool_call>\n{not json}\n</tool_call> b"


def test_an_unfinished_block_is_content_at_the_end():
    content, calls = split_tool_calls('x <tool_call>\n{"name": "f", "argu')
    assert calls == [] and content == 'x <tool_call>\n{"name": "f", "argu'


def test_without_parallel_calls_only_the_first_counts():
    content, calls = split_tool_calls(ANSWER, parallel=False)
    assert [c.name for c in calls] == ["get_weather"] and content.endswith("</tool_call>") and "get_time" in content


def test_text_that_only_looks_like_an_opening_is_released():
    stream = ToolCallStream()
    assert stream.push("a <to") == ["a "]
    assert stream.push("p>") == ["<top>"]
