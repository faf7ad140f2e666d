"""/openapi.json says what the server answers: 400 (not 422) in the error shape, bearer auth only with keys."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from kvcellar.server import ServerSettings, create_app


@pytest.fixture(scope="module")
def engine(server_model_dir):
    from kvcellar.engine import Engine

    engine = Engine.load(str(server_model_dir), block_size=16, num_threads=1)
    yield engine
    engine.close()


def _schema(engine, **settings) -> dict:
    with TestClient(create_app(engine, ServerSettings(**settings))) as client:
        return client.get("/openapi.json").json()


def _operations(schema: dict):
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            yield path, method, operation


def test_bad_requests_are_documented_as_400_in_the_error_shape(engine):
    schema = _schema(engine)
    error_ref = {"$ref": "#/components/schemas/Error"}
    for path, method, operation in _operations(schema):
        responses = operation["responses"]
        assert "422" not in responses, (method, path)
        if method == "post":
            for status in ("400", "413", "415"):
                assert responses[status]["content"]["application/json"]["schema"] == error_ref, (method, path, status)
    assert set(schema["paths"]["/v1/chat/completions"]["post"]["responses"]) == {"200", "400", "413", "415"}
    error = schema["components"]["schemas"]["Error"]["properties"]["error"]
    assert error["required"] == ["message", "type", "param", "code"]
    assert "HTTPValidationError" not in schema["components"]["schemas"]


def test_no_keys_no_security_scheme(engine):
    schema = _schema(engine)
    assert "securitySchemes" not in schema["components"]
    assert [(path, method) for path, method, op in _operations(schema) if "security" in op] == []
    assert [(path, method) for path, method, op in _operations(schema) if "401" in op["responses"]] == []


def test_with_keys_every_keyed_route_declares_bearer_and_401(engine):
    schema = _schema(engine, api_keys={"admin": None})
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    keyed = [(path, method) for path, method, op in _operations(schema) if "security" in op]
    assert ("/v1/chat/completions", "post") in keyed and ("/v1/models/{model_id}", "get") in keyed
    for path, method, operation in _operations(schema):
        assert ("401" in operation["responses"]) == ("security" in operation), (method, path)


def test_the_new_operations_are_listed(engine):
    paths = _schema(engine)["paths"]
    assert set(paths["/health"]) == {"get", "head"}
    assert paths["/v1/models/{model_id}"]["get"]["parameters"][0]["name"] == "model_id"
