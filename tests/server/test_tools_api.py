"""Tool calls and structured output through the official `openai` client, on a random-weight model: the
grammar, not the model, makes every forced call parse and match its schema; later steps of a tool loop
reuse the cached conversation."""

from __future__ import annotations

import json

import jsonschema_rs
import pytest

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                             "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}  # fmt: skip
CLOCK = {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "JST"]}},
         "required": ["zone"], "additionalProperties": False}  # fmt: skip
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "the forecast for a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "the time in a zone", "parameters": CLOCK}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}


def _valid_calls(message) -> list:
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert jsonschema_rs.validator_for(SCHEMAS[call.function.name]).is_valid(json.loads(call.function.arguments))
    return message.tool_calls


def test_a_tool_loop_forced_then_auto_with_cached_steps(server, unique):
    client = server.client()
    messages = [{"role": "system", "content": f"You help with travel. {unique}"},
                {"role": "user", "content": "What is the weather in Paris this week, and the time in Tokyo?"}]
    ask = dict(model=server.model, tools=TOOLS, temperature=0, max_tokens=120)
    first = client.chat.completions.create(messages=messages, tool_choice="required", **ask)
    assert first.choices[0].finish_reason == "tool_calls"
    calls = _valid_calls(first.choices[0].message)
    messages.append({"role": "assistant", "content": None,
                     "tool_calls": [call.model_dump(exclude_none=True) for call in calls]})  # fmt: skip
    for call in calls:
        messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"ok": True, "value": 21})})
    second = client.chat.completions.create(messages=messages, tool_choice="auto", **{**ask, "max_tokens": 8})
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # The first step's prompt (system, user, tools) is a prefix of the second's: its full blocks come cached.
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens // 16 * 16 > 0
    messages.append({"role": "assistant", "content": second.choices[0].message.content or "ok"})
    messages.append({"role": "user", "content": "And the time in Berlin?"})
    third = client.chat.completions.create(messages=messages, tool_choice={"type": "function",
                                                                           "function": {"name": "get_time"}}, **ask)
    assert [call.function.name for call in _valid_calls(third.choices[0].message)] == ["get_time"] * len(
        third.choices[0].message.tool_calls)
    assert third.usage.prompt_tokens_details.cached_tokens >= second.usage.prompt_tokens // 16 * 16


def test_streamed_tool_calls_equal_the_whole_answers(server, unique):
    client = server.client()
    ask = dict(model=server.model, messages=[{"role": "user", "content": f"weather please {unique}"}], tools=TOOLS,
               tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=120)  # fmt: skip
    whole = client.chat.completions.create(**ask)
    calls = _valid_calls(whole.choices[0].message)
    assert len(calls) == 1  # parallel_tool_calls false: one call
    chunks = list(client.chat.completions.create(**ask, stream=True))
    streamed = [call for chunk in chunks if chunk.choices for call in chunk.choices[0].delta.tool_calls or []]
    assert [(c.function.name, c.function.arguments) for c in streamed] == [(c.function.name, c.function.arguments)
                                                                           for c in calls]  # fmt: skip
    assert streamed[0].index == 0 and streamed[0].id.startswith("call_")
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_json_schema_output_validates(server, unique):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                               "tags": {"type": "array", "items": {"type": "string", "maxLength": 6},
                                                        "maxItems": 3},
                                               # an integer in a range: a number's digits could run past max_tokens
                                               "score": {"type": "integer", "minimum": 0, "maximum": 100}},
              "required": ["name", "tags", "score"], "additionalProperties": False}  # fmt: skip
    reply = server.client().chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": f"describe {unique}"}], temperature=0, max_tokens=120,
        response_format={"type": "json_schema", "json_schema": {"name": "card", "schema": schema, "strict": True}})
    assert jsonschema_rs.validator_for(schema).is_valid(json.loads(reply.choices[0].message.content))
    assert reply.choices[0].finish_reason == "stop"
    plain = server.client().chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": f"describe {unique}"}], temperature=0, max_tokens=12)
    with pytest.raises(json.JSONDecodeError):  # the model alone writes no JSON: the grammar did the work
        json.loads(plain.choices[0].message.content)


def test_json_object_output_parses(server, unique):
    reply = server.client().chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": f"json {unique}"}], temperature=0, max_tokens=200,
        response_format={"type": "json_object"})
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:  # an object that grows past max_tokens is cut, as OpenAI's would be
        assert reply.choices[0].message.content.startswith("{")
