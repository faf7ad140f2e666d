"""Property-based fuzzing of the OpenAPI schema (schemathesis): no input makes the server answer 5xx.

The app runs in-process (ASGI) on a real tiny engine. `ShortEngine` caps how
many tokens a request may generate, so a fuzzed max_tokens of 2000 costs
milliseconds; everything the server checks (context, sampling, types) still
sees the request as sent.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import schemathesis
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
    ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/health"),
    ("GET", "/v1/cache/stats"), ("POST", "/v1/cache/probe"), ("POST", "/v1/cache/clear"),
    ("POST", "/v1/cache/budget"), ("GET", "/v1/requests/recent"), ("GET", "/metrics"),
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
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    check()
