"""Bad input gets a 4xx in OpenAI's error shape, with the offending field named, and the server stays up."""

from __future__ import annotations

import openai
import pytest
import requests

CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"
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
    ("n above one", CHAT, {"messages": USER, "n": 2}, 400, "n", "unsupported_parameter"),
    ("logprobs", CHAT, {"messages": USER, "logprobs": True}, 400, "logprobs", "unsupported_parameter"),
    ("two prompts", TEXT, {"prompt": ["a", "b"]}, 400, "prompt", "invalid_type"),
    ("token id outside the vocabulary", TEXT, {"prompt": [1, 10**9]}, 400, "prompt", "invalid_token"),
    ("empty prompt", TEXT, {"prompt": ""}, 400, "prompt", "empty_prompt"),
    ("probe with both inputs", "/v1/cache/probe", {"prompt": "a", "messages": USER}, 400, "messages", "invalid_request"),
    ("clear an unknown tier", "/v1/cache/clear", {"tier": "tape"}, 400, "tier", "unknown_tier"),
    ("budget not a size", "/v1/cache/budget", {"tier": "device", "budget": "lots"}, 400, "budget", "invalid_size"),
    ("budget negative", "/v1/cache/budget", {"tier": "device", "budget": -1}, 400, "budget", "invalid_size"),
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


@pytest.mark.parametrize("raw", [b'{"messages": [', b"[1, 2]", b"not json", b""])
def test_malformed_json_is_a_400(server, raw):
    response = requests.post(server.base_url + CHAT, data=raw, headers={"Content-Type": "application/json"}, timeout=10)
    assert assert_error_shape(response, 400)["code"] == "invalid_json"


def test_unknown_path_and_wrong_method(server):
    assert_error_shape(server.get("/v1/nothing-here"), 404)
    assert_error_shape(server.get(CHAT), 405)


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
