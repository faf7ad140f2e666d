"""Limits on request bodies, enforced before any route sees them (a pure ASGI middleware).

Operations: `BodyLimitMiddleware(app, max_request_bytes)`.

Every HTTP request with a body is read here first, up to `max_request_bytes`:
a declared Content-Length above the limit is refused before one byte is
read, and a body streamed without one (chunked) is refused as soon as the
bytes counted pass the limit, so no body larger than the limit is ever held
in memory. A body that is not declared as JSON (`application/json` or
`*/*+json`) is refused with 415 before parsing. The body read is then
replayed to the application as one message; later `receive` calls (the
disconnect a streaming response waits for) go to the server as usual.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvcellar.server.errors import error_body


class _Refused(Exception):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class BodyLimitMiddleware:
    """Refuses bodies over `max_request_bytes` (413) and bodies that are not JSON (415)."""

    def __init__(self, app: ASGIApp, max_request_bytes: int) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        try:
            body, more = await self._read_body(scope, receive)
        except _Refused as refused:
            await _send_error(send, refused)
            return
        if body and not _is_json(_header(scope, b"content-type")):
            shown = _header(scope, b"content-type") or "none"
            await _send_error(send, _Refused(415, f"the request body must be JSON, sent with 'Content-Type: "
                                                  f"application/json' (got Content-Type: {shown})",
                                             "unsupported_media_type"))  # fmt: skip
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await more()

        await self.app(scope, replay, send)

    async def _read_body(self, scope: Scope, receive: Receive) -> tuple[bytes, Receive]:
        limit = self.max_request_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise _Refused(413, f"the request body is {int(declared)} bytes; this server accepts at most {limit} "
                                "(--max-request-bytes)", "request_too_large")  # fmt: skip
        chunks: list[bytes] = []
        num_bytes = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                # The client left mid-body: the application sees the disconnect and answers nobody.
                return b"".join(chunks), _disconnected
            chunk = message.get("body", b"")
            num_bytes += len(chunk)
            if num_bytes > limit:
                raise _Refused(413, f"the request body is over {limit} bytes, the most this server accepts "
                                    "(--max-request-bytes)", "request_too_large")  # fmt: skip
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), receive


async def _disconnected() -> Message:
    return {"type": "http.disconnect"}


async def _send_error(send: Send, refused: _Refused) -> None:
    body = error_body(refused.status, refused.message, None, refused.code)
    payload = json.dumps(body, separators=(",", ":")).encode()
    # Connection: close: the rest of an oversized body is never read, so the connection cannot be reused.
    await send({"type": "http.response.start", "status": refused.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})  # fmt: skip
    await send({"type": "http.response.body", "body": payload})
