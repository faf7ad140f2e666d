"""Bad input gets a 4xx in OpenAI's error shape, with the offending field named, and the server stays up."""

from __future__ import annotations

import openai
import pytest
import requests

CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"
TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
USER = [{"role": "user", "content": "hi"}]

# (name, path, JSON body, expected status, expected param, expected code); None = not checked.
CASES = [
    ("wrong type: messages", CHAT, {"messages": "hi"}, 400, "messages", "invalid_type"),
    ("wrong type: max_tokens as text", CHAT, {"messages": USER, "max_tokens": "10"}, 400, "max_tokens", "invalid_type"),
    ("wrong type: temperature as bool", CHAT, {"messages": USER, "temperature": True}, 400, "temperature", "invalid_type"),
    ("wrong type: stream", CHAT, {"messages": USER, "stream": "yes"}, 400, "stream", "invalid_type"),
    ("missing messages", CHAT, {"model": "x"}, 400, "messages", "invalid_type"),
    ("empty messages", CHAT, {"messages": []}, 400, "messages", "invalid_type"),
    ("unknown role", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role", "invalid_type"),
    ("unknown model", CHAT, {"model": "gpt-17", "messages": USER}, 404, "model", "model_not_found"),
    ("prompt beyond the context", TEXT, {"prompt": "word " * 3000}, 400, "prompt", "context_length_exceeded"),
    ("chat beyond the context", CHAT, {"messages": [{"role": "user", "content": "word " * 3000}]}, 400, "messages",
     "context_length_exceeded"),
    ("max_tokens 0", CHAT, {"messages": USER, "max_tokens": 0}, 400, "max_tokens", "max_tokens_out_of_range"),
    ("max_tokens past the context", CHAT, {"messages": USER, "max_tokens": 100000}, 400, "max_tokens",
     "max_tokens_out_of_range"),
    ("max_tokens negative", TEXT, {"prompt": "a", "max_tokens": -1}, 400, "max_tokens", "max_tokens_out_of_range"),
    ("temperature too high", CHAT, {"messages": USER, "temperature": 5}, 400, "temperature", "invalid_sampling"),
    ("top_p zero", CHAT, {"messages": USER, "top_p": 0}, 400, "top_p", "invalid_sampling"),
    ("top_k negative", TEXT, {"prompt": "a", "top_k": -1}, 400, "top_k", "invalid_sampling"),
    ("min_p above one", TEXT, {"prompt": "a", "min_p": 1.5}, 400, "min_p", "invalid_sampling"),
    ("seed negative", TEXT, {"prompt": "a", "seed": -1}, 400, "seed", "invalid_sampling"),
    ("empty stop string", TEXT, {"prompt": "a", "stop": [""]}, 400, None, "invalid_sampling"),
    ("too many stop strings", TEXT, {"prompt": "a", "stop": ["x"] * 17}, 400, "stop", "invalid_type"),
    ("n above 16", CHAT, {"messages": USER, "n": 17}, 400, "n", "invalid_type"),
    ("n zero", TEXT, {"prompt": "a", "n": 0}, 400, "n", "invalid_type"),
    ("top_logprobs without logprobs", CHAT, {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs",
     "unsupported_parameter"),
    ("top_logprobs above 20", CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 21}, 400, "logprobs",
     "invalid_sampling"),
    ("presence_penalty above 2", CHAT, {"messages": USER, "presence_penalty": 2.5}, 400, "presence_penalty",
     "invalid_sampling"),
    ("logit_bias above 100", TEXT, {"prompt": "a", "logit_bias": {"5": 101}}, 400, "logit_bias", "invalid_sampling"),
    ("logit_bias key not an id", TEXT, {"prompt": "a", "logit_bias": {"five": 1}}, 400, "logit_bias",
     "invalid_sampling"),
    ("logit_bias id outside the vocabulary", TEXT, {"prompt": "a", "logit_bias": {str(10**9): 1}}, 400, "logit_bias",
     "invalid_token"),
    ("stop_token_ids outside the vocabulary", TEXT, {"prompt": "a", "stop_token_ids": [10**9]}, 400, "stop_token_ids",
     "invalid_token"),
    ("two prompts", TEXT, {"prompt": ["a", "b"]}, 400, "prompt", "invalid_type"),
    ("token id outside the vocabulary", TEXT, {"prompt": [1, 10**9]}, 400, "prompt", "invalid_token"),
    ("empty prompt", TEXT, {"prompt": ""}, 400, "prompt", "empty_prompt"),
    ("probe with both inputs", "/v1/cache/probe", {"prompt": "a", "messages": USER}, 400, "messages", "invalid_request"),
    ("clear an unknown tier", "/v1/cache/clear", {"tier": "tape"}, 400, "tier", "unknown_tier"),
    ("budget not a size", "/v1/cache/budget", {"tier": "device", "budget": "lots"}, 400, "budget", "invalid_size"),
    ("budget negative", "/v1/cache/budget", {"tier": "device", "budget": -1}, 400, "budget", "invalid_size"),
    ("budget of 2**80 bytes", "/v1/cache/budget", {"tier": "device", "budget": 2**80}, 400, "budget", "invalid_size"),
    ("budget of 2**80 as text", "/v1/cache/budget", {"tier": "device", "budget": f"{2**70}K"}, 400, "budget",
     "invalid_size"),
    # requests writes "\ud800" as the JSON escape, which decodes to a lone surrogate.
    ("lone surrogate: chat", CHAT, {"messages": [{"role": "user", "content": "a\ud800b"}]}, 400, "messages.0.content",
     "invalid_unicode"),
    ("lone surrogate: chat part", CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
     400, "messages.0.content.0.text", "invalid_unicode"),
    ("lone surrogate: prompt", TEXT, {"prompt": "\ud800"}, 400, "prompt", "invalid_unicode"),
    ("lone surrogate: prompt list", TEXT, {"prompt": ["\ud800"]}, 400, "prompt.0", "invalid_unicode"),
    ("lone surrogate: stop", TEXT, {"prompt": "a", "stop": "\ud800"}, 400, "stop", "invalid_unicode"),
    ("lone surrogate: probe", "/v1/cache/probe", {"prompt": "\ud800"}, 400, "prompt", "invalid_unicode"),
    ("lone surrogate: probe chat", "/v1/cache/probe", {"messages": [{"role": "user", "content": "\ud800"}]}, 400,
     "messages.0.content", "invalid_unicode"),
    ("probe beyond the context", "/v1/cache/probe", {"prompt": "word " * 3000}, 400, "prompt", "context_length_exceeded"),
    ("probe chat beyond the context", "/v1/cache/probe", {"messages": [{"role": "user", "content": "word " * 3000}]}, 400,
     "messages", "context_length_exceeded"),
    # 2 MB of text: refused by its length in characters, before tokenizing (test_limits.py checks no encode runs).
    ("prompt of 2 MB", TEXT, {"prompt": "word " * 400_000}, 400, "prompt", "context_length_exceeded"),
    ("chat of 2 MB", CHAT, {"messages": [{"role": "user", "content": "word " * 400_000}]}, 400, "messages",
     "context_length_exceeded"),
    ("response_format of an unknown type", CHAT, {"messages": USER, "response_format": {"type": "yaml"}}, 400,
     "response_format", "invalid_request"),
    ("json_schema without a schema", CHAT, {"messages": USER, "response_format": {"type": "json_schema"}}, 400,
     "response_format", "invalid_request"),
    ("a schema the grammar engine refuses", CHAT, {"messages": USER, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}}, 400, "response_format",
     "invalid_schema"),
    ("tool_choice required without tools", CHAT, {"messages": USER, "tool_choice": "required"}, 400, "tool_choice",
     "invalid_request"),
    ("tool_choice names a missing tool", CHAT, {"messages": USER, "tools": [TOOL],
                                                "tool_choice": {"type": "function", "function": {"name": "f"}}},
     400, "tool_choice", "invalid_request"),
    ("a tool without a name", CHAT, {"messages": USER, "tools": [{"type": "function", "function": {}}]}, 400, "tools",
     "invalid_request"),
    ("response_format with tools on auto", CHAT, {"messages": USER, "tools": [TOOL],
                                                  "response_format": {"type": "json_object"}}, 400, "response_format",
     "unsupported_parameter"),
    ("tool_calls on a user message", CHAT, {"messages": [{"role": "user", "content": "hi", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, 400, "messages", "invalid_request"),
    ("reasoning_effort", CHAT, {"messages": USER, "reasoning_effort": "low"}, 400, "reasoning_effort",
     "unsupported_parameter"),
]


def assert_error_shape(response: requests.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and len(error["message"]) > 10
    assert error["type"] == ("invalid_request_error" if status in (400, 404, 405) else error["type"])
    return error


@pytest.mark.parametrize(("name", "path", "body", "status", "param", "code"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_its_4xx(server, name, path, body, status, param, code):
    error = assert_error_shape(server.post(path, body), status)
    if param is not None:
        assert error["param"] == param, error
    assert error["code"] == code, error


@pytest.mark.parametrize("raw", [b'{"messages": [', b"[1, 2]", b"not json", b"", b'{"prompt": "\xff\xfe"}',
                                 b"[" * 100_000 + b"]" * 100_000, b'{"prompt": ' + b"[" * 100_000])  # fmt: skip
@pytest.mark.parametrize("path", [CHAT, TEXT])
def test_malformed_json_is_a_400(server, raw, path):
    response = requests.post(server.base_url + path, data=raw, headers={"Content-Type": "application/json"}, timeout=30)
    assert assert_error_shape(response, 400)["code"] == "invalid_json"


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
@pytest.mark.parametrize("path", [CHAT, TEXT, "/v1/cache/probe", "/v1/cache/budget"])
def test_a_body_not_sent_as_json_is_a_415(server, content_type, path):
    headers = {"Content-Type": content_type} if content_type else {}
    response = requests.post(server.base_url + path, data=b'{"prompt": "hi"}', headers=headers, timeout=30)
    assert assert_error_shape(response, 415)["code"] == "unsupported_media_type"


def test_json_media_types_are_accepted(server):
    for content_type in ["application/json; charset=utf-8", "application/vnd.api+json"]:
        response = requests.post(server.base_url + TEXT, data=b'{"prompt": "hi", "max_tokens": 1}',
                                 headers={"Content-Type": content_type}, timeout=60)  # fmt: skip
        assert response.status_code == 200, response.text


def test_unknown_path_and_wrong_method(server):
    assert assert_error_shape(server.get("/v1/nothing-here"), 404)["code"] == "unknown_endpoint"
    assert assert_error_shape(server.get(CHAT), 405)["code"] == "method_not_allowed"


def test_models_by_id_and_health_by_head(server):
    listed = server.get("/v1/models").json()["data"]
    assert server.get(f"/v1/models/{server.model}").json() == listed[0]
    error = assert_error_shape(server.get("/v1/models/gpt-17"), 404)
    assert (error["param"], error["code"]) == ("model", "model_not_found")
    head = requests.head(server.base_url + "/health", timeout=30)
    assert (head.status_code, head.content) == (200, b"")


def test_official_client_raises_the_matching_errors(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-17", messages=USER)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=server.model, messages=USER, temperature=9)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=server.model, prompt="word " * 3000, stream=True)


def test_server_stays_up_after_bad_input(server):
    for _, path, body, *_ in CASES:
        server.post(path, body)
    assert server.get("/health").json()["status"] == "ok"
    reply = server.client().completions.create(model=server.model, prompt="still here", max_tokens=2)
    assert reply.usage.completion_tokens >= 1
