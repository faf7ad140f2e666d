"""Anthropic's Messages API through the official `anthropic` client: whole and streamed answers, tools
with forced calls whose inputs match their schemas, cache reads on the second turn, token counts,
and refusals in Anthropic's error shape."""

from __future__ import annotations

import anthropic
import jsonschema_rs
import pytest
import requests

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                             "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}  # fmt: skip
GREEDY = {"temperature": 0}  # current clients send no temperature; the server still takes one in the body
TOOLS = [{"name": "get_weather", "description": "the forecast for a city", "input_schema": WEATHER}]


def _client(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key=server.admin_key or "unused", max_retries=0,
                               timeout=60.0)  # fmt: skip


def test_two_turns_whole_then_streamed_read_the_cache(server, unique):
    client = _client(server)
    system = [{"type": "text", "text": f"You are terse. {unique} " * 6, "cache_control": {"type": "ephemeral"}}]
    turn = [{"role": "user", "content": "Say hello."}]
    first = client.messages.create(model=server.model, max_tokens=6, system=system, messages=turn, extra_body=GREEDY)
    assert first.type == "message" and first.role == "assistant" and first.content[0].type == "text"
    assert first.stop_reason in ("end_turn", "max_tokens")
    usage = first.usage
    assert usage.cache_read_input_tokens == 0 and usage.cache_creation_input_tokens > 0
    assert usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens > 0
    conversation = turn + [{"role": "assistant", "content": first.content[0].text or "hi"},
                           {"role": "user", "content": "Again."}]  # fmt: skip
    with client.messages.stream(model=server.model, max_tokens=6, system=system, messages=conversation,
                                extra_body=GREEDY) as stream:  # fmt: skip
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "".join(block.text for block in final.content if block.type == "text")
    # The first turn's prompt is a prefix of the second's: its full blocks (16 tokens) are read back.
    first_prompt = usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens
    assert final.usage.cache_read_input_tokens >= first_prompt // 16 * 16 > 0
    assert 1 <= final.usage.output_tokens <= 6


def test_forced_tool_use_then_a_tool_result(server, unique):
    client = _client(server)
    messages = [{"role": "user", "content": f"Weather in Oslo? {unique}"}]
    ask = dict(model=server.model, max_tokens=100, tools=TOOLS, extra_body=GREEDY)
    first = client.messages.create(messages=messages, tool_choice={"type": "any"}, **ask)
    assert first.stop_reason == "tool_use"
    uses = [block for block in first.content if block.type == "tool_use"]
    assert uses and all(jsonschema_rs.validator_for(WEATHER).is_valid(use.input) for use in uses)
    assert uses[0].id.startswith("toolu_") and uses[0].name == "get_weather"
    messages += [{"role": "assistant", "content": [use.model_dump() for use in uses]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}
                                              for use in uses]}]  # fmt: skip
    with client.messages.stream(messages=messages, tool_choice={"type": "tool", "name": "get_weather",
                                                                "disable_parallel_tool_use": True}, **ask) as stream:
        second = stream.get_final_message()
    calls = [block for block in second.content if block.type == "tool_use"]
    assert len(calls) == 1 and jsonschema_rs.validator_for(WEATHER).is_valid(calls[0].input)
    assert second.stop_reason == "tool_use"
    assert second.usage.cache_read_input_tokens > 0  # the first step's prompt came back from the cache


def test_count_tokens_counts_what_a_generation_prefills(server, unique):
    client = _client(server)
    messages = [{"role": "user", "content": f"count me {unique}"}]
    counted = client.messages.count_tokens(model=server.model, messages=messages, tools=TOOLS).input_tokens
    reply = client.messages.create(model=server.model, max_tokens=1, messages=messages, tools=TOOLS, extra_body=GREEDY)
    usage = reply.usage
    assert counted == usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens


def test_a_stop_sequence_is_reported(server, unique):
    client = _client(server)
    messages = [{"role": "user", "content": f"words {unique}"}]
    free = client.messages.create(model=server.model, max_tokens=12, messages=messages, extra_body=GREEDY)
    text = free.content[0].text
    stop = text.strip()[3:6] if len(text.strip()) > 6 else None
    if stop is None:
        pytest.skip("the model's answer is too short to cut")
    cut = client.messages.create(model=server.model, max_tokens=12, messages=messages, extra_body=GREEDY,
                                 stop_sequences=[stop])  # fmt: skip
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert stop not in cut.content[0].text


@pytest.mark.parametrize("body, words", [
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "image"),
    ({"messages": [{"role": "user", "content": "hi"}], "thinking": {"type": "enabled", "budget_tokens": 1024}},
     "thinking"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 1.5}, "temperature"),
])  # fmt: skip
def test_unsupported_fields_are_refused_in_anthropics_shape(server, body, words):
    response = requests.post(server.base_url + "/v1/messages", json={"model": server.model, "max_tokens": 4, **body},
                             headers={"x-api-key": server.admin_key or "unused"}, timeout=30)  # fmt: skip
    assert response.status_code == 400
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert words in error["error"]["message"]
