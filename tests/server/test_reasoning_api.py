"""Reasoning comes back as `reasoning_content`, whole and streamed, with tool calls after it.

This isolates the server's rendering of an answer from the model: a random-weight model never writes a
reasoning block, so the answers here are written by hand as the engine's results and events."""

from __future__ import annotations

import asyncio
import json

from kvcellar.chat.reasoning import ReasoningSplit
from kvcellar.chat.tools import ToolChoice
from kvcellar.engine import GenerationResult, StreamEvent
from kvcellar.engine.request import Timings
from kvcellar.server.openai_stream import stream_chunks
from kvcellar.server.responses import completion_body

ANSWER = '<think>\nNeed the weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
HEADER = ("chat", "chatcmpl-1", 0, "m")


def _result(text: str) -> GenerationResult:
    return GenerationResult(text=text, token_ids=tuple(range(len(text))), finish_reason="stop", num_prompt_tokens=3,
                            num_cached_tokens=0, cached_tokens_by_tier={}, timings=Timings())  # fmt: skip


def test_whole_answer_has_reasoning_then_the_tool_call():
    body = completion_body(*HEADER, [_result(ANSWER)], None, ToolChoice("auto"), ReasoningSplit())
    message = body["choices"][0]["message"]
    assert message["reasoning_content"] == "\nNeed the weather.\n"
    assert message["content"] is None and message["tool_calls"][0]["function"]["name"] == "get_weather"
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    plain = completion_body(*HEADER, [_result(ANSWER)], None, ToolChoice("auto"), None)["choices"][0]["message"]
    assert "reasoning_content" not in plain  # a template that marks no reasoning: nothing is split


async def _events(text: str, size: int):
    for start in range(0, len(text), size):
        yield StreamEvent(text=text[start : start + size], token_id=start)
    yield StreamEvent(result=_result(text))


def test_streamed_reasoning_and_calls_equal_the_whole_answer():
    async def collect(size: int) -> list[dict]:
        chunks = [c async for c in stream_chunks(HEADER, [_events(ANSWER, size)], False, str, ToolChoice("auto"),
                                                  ReasoningSplit())]  # fmt: skip
        return [json.loads(c[len("data: "):]) for c in chunks if not c.startswith("data: [DONE]")]

    for size in (1, 3, 7, len(ANSWER)):
        deltas = [chunk["choices"][0]["delta"] for chunk in asyncio.run(collect(size))]
        assert "".join(d.get("reasoning_content", "") for d in deltas) == "\nNeed the weather.\n"
        assert "".join(d.get("content") or "" for d in deltas) == ""
        calls = [call for d in deltas for call in d.get("tool_calls", [])]
        assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Oslo"}]
