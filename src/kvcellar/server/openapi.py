"""The OpenAPI document at /openapi.json, made to say what the server answers.

Operations: `install_openapi(app, settings)`.

FastAPI documents a 422 for every request it validates and a bearer scheme
for every route with the key dependency. This server answers bad requests
with 400 (and 413 / 415 for bodies it will not read) in OpenAI's error
shape, and asks for a key only when keys are configured; the document is
rewritten once, on first request, to match.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from kvcellar.config import ServerSettings

_ERROR_SCHEMA = {
    "title": "Error",
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {
            "message": {"type": "string"},
            "type": {"type": "string", "description": "invalid_request_error, authentication_error, ..."},
            "param": {"anyOf": [{"type": "string"}, {"type": "null"}], "description": "the field at fault"},
            "code": {"anyOf": [{"type": "string"}, {"type": "null"}], "description": "see docs/api.md"},
        },
    }},
}  # fmt: skip
_ERROR_REF = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
_BODY_ERRORS = {
    "413": "the body is over --max-request-bytes (code request_too_large)",
    "415": "the body is not sent as application/json (code unsupported_media_type)",
}


def _error(description: str) -> dict:
    return {"description": description, "content": _ERROR_REF}


def _rewrite(schema: dict, auth_required: bool) -> dict:
    schema.setdefault("components", {}).setdefault("schemas", {})["Error"] = _ERROR_SCHEMA
    for methods in schema.get("paths", {}).values():
        for method, operation in methods.items():
            responses = operation.setdefault("responses", {})
            if responses.pop("422", None) is not None:
                responses["400"] = _error("bad request: wrong types, bad JSON, values out of range (see `code`)")
            if method == "post":
                responses.update({status: _error(text) for status, text in _BODY_ERRORS.items()})
            if auth_required and "security" in operation:
                responses["401"] = _error("missing or invalid API key")
            elif not auth_required:
                operation.pop("security", None)
    if not auth_required:
        schema["components"].pop("securitySchemes", None)
    for name in ("HTTPValidationError", "ValidationError"):
        schema["components"]["schemas"].pop(name, None)
    return schema


def install_openapi(app: FastAPI, settings: ServerSettings) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            app.openapi_schema = _rewrite(schema, settings.auth_required)
        return app.openapi_schema

    app.openapi = openapi
