"""Errors at the HTTP edge, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}; on
Anthropic's endpoints (/v1/messages...) in Anthropic's: {"type": "error", "error": {"type", "message"}}.

Operations: `APIError` (raise it anywhere in a route), `error_body`,
`install_error_handlers(app)`: maps APIError, the engine's
InvalidRequestError, request validation (bad JSON, wrong types) and
Starlette's HTTP errors (404, 405) to that shape. Anything else is a 500 in
the same shape, logged with its traceback; the server keeps serving.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvcellar.errors import InvalidRequestError

log = logging.getLogger(__name__)

_TYPE_BY_STATUS = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
                   429: "rate_limit_error"}  # fmt: skip


class APIError(Exception):
    """A request the server refuses, with the status and the words the client sees."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return _TYPE_BY_STATUS.get(status, "invalid_request_error")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   request: Request | None = None) -> JSONResponse:  # fmt: skip
    """The error in the shape of the endpoint's API (`request`'s path; None: OpenAI's)."""
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    if request is not None and request.url.path.startswith(ANTHROPIC_PREFIX):
        return JSONResponse(anthropic_error_body(status, message, param), status_code=status, headers=headers)
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


ANTHROPIC_PREFIX = "/v1/messages"
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error"}  # fmt: skip


def anthropic_error_body(status: int, message: str, param: str | None = None) -> dict:
    kind = "api_error" if status >= 500 else _ANTHROPIC_TYPES.get(status, "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": f"{param}: {message}" if param else message}}


# Fields whose type is a union: pydantic reports one error per branch, we say what is accepted.
_UNION_HINTS = {
    "prompt": "must be a string, a list of one string, or a list of token ids (integers)",
    "stop": "must be a string or a list of at most 16 strings",
    "content": "must be a string, a list of {'type': 'text', 'text': ...} parts, or null",
    "budget": "must be a number of bytes or a size such as '512M'",
}
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _field_path(loc: tuple) -> list[str]:
    """The request-field part of a pydantic error location, without "body" and union branch tags."""
    return [str(part) for part in loc if part != "body" and not (isinstance(part, str) and ("[" in part or part in _TYPE_TAGS))]


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None, str]:
    """The first validation error as (message, param, code)."""
    errors = exc.errors()
    if not errors:
        return "the request is invalid", None, "invalid_request"
    # A union field reports one error per branch; bad text in the string branch is the one that matters.
    first = next((e for e in errors if e.get("type") == "invalid_unicode"), errors[0])
    if first.get("type") == "invalid_unicode":
        param = ".".join(_field_path(tuple(first.get("loc", ())))) or None
        return f"{param}: {first.get('msg')}", param, "invalid_unicode"
    loc = _field_path(tuple(first.get("loc", ())))
    param = ".".join(loc) or None
    same_field = [e for e in errors if _field_path(tuple(e.get("loc", ()))) == loc]
    if loc and loc[-1] in _UNION_HINTS and len(same_field) > 1:
        return f"{param}: {_UNION_HINTS[loc[-1]]}", param, "invalid_type"
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", first.get("msg"))
        return f"the request body is not valid JSON: {reason}", None, "invalid_json"
    if param is None:  # the body itself: missing, not JSON, or not an object
        return ("the request body must be a JSON object, sent with 'Content-Type: application/json'",
                None, "invalid_json")  # fmt: skip
    where = f"{param}: " if param else ""
    extra = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"{where}{first.get('msg', 'invalid value')}{extra}", param, "invalid_type"


async def _on_api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param, exc.code, request)


async def _on_invalid_request(request: Request, exc: InvalidRequestError) -> JSONResponse:
    return error_response(400, str(exc), exc.field, exc.code, request)


async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param, code = _describe_validation(exc)
    return error_response(400, message, param, code, request)


def _unparsable_body(cause: BaseException | None) -> str:
    """Why FastAPI could not parse a body that its JSON decoder did not reject itself."""
    if isinstance(cause, UnicodeDecodeError):
        return f"the request body is not valid UTF-8 (byte {cause.start}): send JSON text encoded as UTF-8"
    if isinstance(cause, RecursionError):
        return "the request body nests JSON arrays or objects too deeply to parse: flatten it"
    return "the request body could not be parsed as JSON"


async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 400:  # raised only by FastAPI's body parsing (invalid UTF-8, nesting too deep)
        return error_response(400, _unparsable_body(exc.__cause__), None, "invalid_json", request)
    messages = {404: f"no such endpoint: {request.method} {request.url.path}",
                405: f"method {request.method} is not allowed on {request.url.path}"}  # fmt: skip
    codes = {404: "unknown_endpoint", 405: "method_not_allowed"}
    return error_response(exc.status_code, messages.get(exc.status_code, str(exc.detail)), None,
                          codes.get(exc.status_code, "http_error"), request)  # fmt: skip


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error on %s %s", request.method, request.url.path)
    return error_response(500, f"internal server error ({type(exc).__name__}); see the server log", None, None, request)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(InvalidRequestError, _on_invalid_request)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(Exception, _on_unexpected)
