"""Property-based fuzzing of every endpoint: no input makes the server answer 5xx, and every 4xx has a code.

schemathesis draws requests from the OpenAPI schema (valid ones and ones that
break it on purpose); hypothesis draws raw bodies the schema cannot describe
(any bytes, any JSON, any content type). Each runs a bounded number of
examples, derandomized, so the suite's time and outcome do not vary.

The app runs in-process (ASGI) on a real tiny engine. `ShortEngine` caps how
many tokens a request may generate, so a fuzzed max_tokens of 2000 costs
milliseconds; everything the server checks (context, sampling, types) still
sees the request as sent.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from kvcellar.server import ServerSettings, create_app

MAX_EXAMPLES = 30


class ShortEngine:
    """The real engine, with generation capped at 4 tokens."""

    def __init__(self, engine: object) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> object:
        return getattr(self._engine, name)

    def stream(self, *args, params=None, **kwargs):
        return self._engine.stream(*args, params=replace(params, max_tokens=min(params.max_tokens, 4)), **kwargs)


@pytest.fixture(scope="module")
def fuzz_engine(server_model_dir):
    from kvcellar.engine import Engine

    engine = Engine.load(str(server_model_dir), block_size=16, num_threads=1)
    yield ShortEngine(engine)
    engine.close()


OPERATIONS = [
    ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"),
    ("GET", "/v1/models/{model_id}"), ("GET", "/health"), ("HEAD", "/health"),
    ("GET", "/v1/cache/stats"), ("POST", "/v1/cache/probe"), ("POST", "/v1/cache/clear"),
    ("POST", "/v1/cache/budget"), ("GET", "/v1/requests/recent"), ("GET", "/metrics"),
    ("POST", "/v1/messages"), ("POST", "/v1/messages/count_tokens"),
]  # fmt: skip


@pytest.fixture(scope="module")
def api_schema(fuzz_engine):
    app = create_app(fuzz_engine, ServerSettings())
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_every_operation_is_fuzzed(api_schema):
    found = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


def _cases(operation):
    """Valid requests and, where the schema allows it, requests that break the schema on purpose."""
    strategies = [operation.as_strategy(GenerationMode.POSITIVE)]
    try:
        strategies.append(operation.as_strategy(GenerationMode.NEGATIVE))
    except Exception:  # noqa: BLE001 - an operation with nothing to break (no parameters, no body)
        pass
    return st.one_of(strategies)


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_no_input_gives_a_server_error(api_schema, method, path):
    operation = api_schema[path][method]

    @given(case=_cases(operation))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)  # fmt: skip
    def check(case):
        response = case.call()
        assert response.status_code < 500, f"{case.method} {case.path} -> {response.status_code}: {response.text[:500]}"
        if response.status_code >= 400 and path.startswith("/v1/messages"):  # Anthropic's error shape
            body = response.json()
            assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
        elif response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["code"] is not None, error

    check()


POST_PATHS = [path for method, path in OPERATIONS if method == "POST"]
_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                     max_leaves=12)  # fmt: skip
_FIELDS = ["messages", "prompt", "model", "max_tokens", "stop", "tier", "budget", "response_format", "cache_salt", "tools",
           "tool_choice", "system", "logit_bias", "n"]
# Raw bodies the schema cannot describe: any bytes, any JSON, known fields with any JSON value, any content type.
_BODIES = st.one_of(
    st.binary(max_size=64).map(lambda raw: (raw, "application/json")),
    _JSON.map(lambda value: (json.dumps(value).encode(), "application/json")),
    st.dictionaries(st.sampled_from(_FIELDS), _JSON, max_size=4).map(lambda d: (json.dumps(d).encode(), "application/json")),
    st.tuples(st.binary(max_size=16), st.sampled_from(["text/plain", "application/xml", "", "application/json; x=1"])),
)


@pytest.fixture(scope="module")
def fuzz_client(fuzz_engine):
    with TestClient(create_app(fuzz_engine, ServerSettings())) as client:
        yield client


@pytest.mark.parametrize("path", POST_PATHS)
def test_no_raw_body_gives_a_server_error(fuzz_client, path):
    @given(body=_BODIES)
    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)  # fmt: skip
    def check(body):
        raw, content_type = body
        response = fuzz_client.post(path, content=raw, headers={"Content-Type": content_type} if content_type else {})
        assert response.status_code < 500, f"{path} {raw[:200]!r} -> {response.status_code}: {response.text[:500]}"
        if response.status_code >= 400 and path.startswith("/v1/messages"):  # Anthropic's shape: no code
            assert response.json()["error"]["type"] == "invalid_request_error", response.text
        elif response.status_code >= 400:
            assert response.json()["error"]["code"] is not None, response.text

    check()
