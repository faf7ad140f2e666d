"""Bounded memory for hostile bodies: --max-request-bytes (413) and the character guard before tokenizing."""

from __future__ import annotations

import json
import re

import pytest
import requests
from fastapi.testclient import TestClient

from kvcellar.server import ServerSettings, create_app
from kvcellar.server.prepare import SAMPLE_CHARS_PER_TOKEN, max_chars_per_token

LIMIT = 64 * 1024


def _body_of(num_bytes: int) -> bytes:
    """A valid completion request of exactly num_bytes bytes (padded in the `user` field)."""
    empty = json.dumps({"prompt": "limit", "max_tokens": 1, "user": ""}).encode()
    body = json.dumps({"prompt": "limit", "max_tokens": 1, "user": "u" * (num_bytes - len(empty))}).encode()
    assert len(body) == num_bytes
    return body


@pytest.fixture(scope="module")
def small_server(start_server):
    return start_server("--max-request-bytes", "64K")


def _post(server, data, **headers) -> requests.Response:
    return requests.post(server.base_url + "/v1/completions", data=data, timeout=60,
                         headers={"Content-Type": "application/json", **headers})  # fmt: skip


def test_a_body_at_the_limit_is_served(small_server):
    response = _post(small_server, _body_of(LIMIT))
    assert response.status_code == 200, response.text


def test_a_body_one_byte_over_the_limit_is_a_413(small_server):
    response = _post(small_server, _body_of(LIMIT + 1))
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", None, "request_too_large")


def test_a_chunked_body_is_counted_as_it_streams(small_server):
    body = _body_of(LIMIT + 1)

    def chunks():  # no Content-Length: requests sends Transfer-Encoding: chunked
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    response = _post(small_server, chunks())
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "request_too_large"
    assert _post(small_server, _body_of(LIMIT)).status_code == 200  # and the server still serves


def test_a_declared_length_over_the_limit_is_refused_before_reading(server):
    """The default limit is 8 MiB; 9 MiB declared is refused (the body need not arrive)."""
    response = _post(server, b"x" * (9 * 1024 * 1024))
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "request_too_large"
    assert server.get("/health").status_code == 200


class CountingEngine:
    """The real engine, counting encode calls: isolates whether a prompt was tokenized at all."""

    def __init__(self, engine: object) -> None:
        self._engine = engine
        self.num_encodes = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._engine, name)

    def encode(self, *args, **kwargs):
        self.num_encodes += 1
        return self._engine.encode(*args, **kwargs)


@pytest.fixture(scope="module")
def counting_client(server_model_dir):
    from kvcellar.engine import Engine

    engine = Engine.load(str(server_model_dir), block_size=16, num_threads=1)
    counting = CountingEngine(engine)
    with TestClient(create_app(counting, ServerSettings())) as client:
        yield client, counting
    engine.close()


@pytest.mark.parametrize(("path", "field"), [("/v1/completions", "prompt"), ("/v1/cache/probe", "prompt"),
                                             ("/v1/chat/completions", "messages")])  # fmt: skip
def test_text_too_long_for_any_tokenization_is_refused_untokenized(counting_client, path, field):
    client, engine = counting_client
    limit = engine.context_length * max_chars_per_token(engine.tokenizer)
    text = "z" * (limit + 1)
    body = {"prompt": text} if field == "prompt" else {"messages": [{"role": "user", "content": text}]}
    before = engine.num_encodes
    response = client.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (field, "context_length_exceeded")
    assert f"{limit + 1} characters" in error["message"]
    assert engine.num_encodes == before


def test_text_past_the_sample_bound_is_judged_by_a_bounded_sample(counting_client):
    """Within the character bound, a long text whose leading sample alone overflows the context: 400, whole text
    never tokenized (the engine's encode not called; the sample goes to the tokenizer directly)."""
    client, engine = counting_client
    sample_chars = engine.context_length * SAMPLE_CHARS_PER_TOKEN
    limit = engine.context_length * max_chars_per_token(engine.tokenizer)
    assert sample_chars < limit  # else the first bound decides alone
    before = engine.num_encodes
    response = client.post("/v1/completions", json={"prompt": "z" * limit})
    error = response.json()["error"]
    assert (response.status_code, error["code"]) == (400, "context_length_exceeded")
    assert f"its first {sample_chars} alone are" in error["message"]
    assert engine.num_encodes == before


def test_text_at_the_sample_bound_is_tokenized(counting_client):
    """At the sample's size itself the guard cannot know: the tokenizer decides (here: too many tokens)."""
    client, engine = counting_client
    before = engine.num_encodes
    response = client.post("/v1/completions", json={"prompt": "z" * (engine.context_length * SAMPLE_CHARS_PER_TOKEN)})
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert "tokens but the model's context" in response.json()["error"]["message"]
    assert engine.num_encodes == before + 1


def test_the_bound_is_the_longest_vocabulary_entry_times_nfc(server_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(server_model_dir))
    longest = max(len(piece) for piece in tokenizer.get_vocab())
    assert max_chars_per_token(tokenizer) == 4 * longest


def test_answers_refused_for_the_body_are_counted_as_rejected(counting_client):
    """413 and 415 are answered before any route runs; /metrics still counts them by status."""
    _, engine = counting_client
    with TestClient(create_app(engine, ServerSettings(max_request_bytes=1024))) as client:
        assert client.post("/v1/completions", content=b"x" * 2048, headers={"Content-Type": "application/json"}).status_code == 413
        assert client.post("/v1/completions", content=b"{}", headers={"Content-Type": "text/plain"}).status_code == 415
        text = client.get("/metrics").text
    counts = dict(re.findall(r'^kvcellar_requests_rejected_total\{status="(\d+)"\} (\S+)$', text, re.M))
    assert (counts.get("413"), counts.get("415")) == ("1.0", "1.0")
