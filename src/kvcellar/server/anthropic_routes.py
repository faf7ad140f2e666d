"""Anthropic's Messages API: POST /v1/messages (whole or streamed) and POST /v1/messages/count_tokens.

A request is translated to the chat request kvcellar runs (server/anthropic_schemas.py) and prepared,
queued and cancelled exactly as /v1/chat/completions; the answer comes back as Anthropic's content
blocks: text, then `tool_use` blocks for the tool calls parsed out of it (chat/tool_calls.py).

Usage from the real cache: `cache_read_input_tokens` are the prompt tokens restored from the cache,
`cache_creation_input_tokens` the prompt tokens this request computed and stored (every computed
prompt token is stored unless the cache is off), `input_tokens` the rest, as Anthropic counts them
(input_tokens + cache reads + cache writes = the prompt). A stream's `message_start` carries the cache
figures a probe found when the request was queued; its `message_delta` carries the final ones.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from kvcellar.chat.tool_calls import ToolCall, ToolCallStream, split_tool_calls
from kvcellar.engine import GenerationResult, StreamEvent
from kvcellar.server.anthropic_schemas import CountTokensRequest, MessagesRequest
from kvcellar.server.auth import Tenant, current_tenant
from kvcellar.server.bridge import collect_results
from kvcellar.server.errors import APIError, anthropic_error_body
from kvcellar.server.prepare import Prepared, check_model, encode_chat, prepare_generation, tools_and_grammar
from kvcellar.server.telemetry import new_request_id

router = APIRouter()
_STOP_REASONS = {"length": "max_tokens"}


def _check(body: CountTokensRequest) -> None:
    unsupported = body.unsupported_fields()
    if unsupported:
        raise APIError(400, f"not supported by this server: {', '.join(unsupported)}", code="unsupported_parameter",
                       param=unsupported[0].split(" ")[0])  # fmt: skip


@router.post("/v1/messages/count_tokens", tags=["anthropic"])
async def count_tokens(body: CountTokensRequest, request: Request, tenant: Tenant = Depends(current_tenant)) -> dict:
    """The prompt's tokens as this model's chat template renders it, tools included."""
    engine = request.app.state.engine
    check_model(engine, body.model)
    _check(body)
    chat = MessagesRequest.model_validate({**body.model_dump(exclude_none=True), "max_tokens": 1}).to_chat()

    def count() -> int:
        tools, _, _ = tools_and_grammar(chat)  # the same tools as a generation shows
        return len(encode_chat(engine, chat.messages, tools)[0])

    return {"input_tokens": await run_in_threadpool(count)}


@router.post("/v1/messages", tags=["anthropic"])
async def messages(body: MessagesRequest, request: Request, tenant: Tenant = Depends(current_tenant)):
    """A model answer as Anthropic's Messages API gives it; usage reports the cache's reads and writes."""
    state = request.app.state
    _check(body)
    chat = body.to_chat()
    created_s, arrived = time.time(), time.perf_counter()
    prepared = await run_in_threadpool(prepare_generation, state.engine, chat, tenant, state.settings, body.last_breakpoint())
    request_id = new_request_id("msg")
    on_end = state.telemetry.recorder(request_id, "messages", prepared, stream=body.stream, created_s=created_s,
                                      arrived=arrived)  # fmt: skip
    probed = await run_in_threadpool(state.engine.probe, prepared=prepared.prompt) if body.stream else None
    events = state.bridge.events(prepared, on_end)
    model = state.engine.model_name
    if body.stream:
        return StreamingResponse(_stream(request_id, model, prepared, probed.num_cached_tokens, events,
                                         state.engine.config.cache.enabled),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})  # fmt: skip
    results = await collect_results([events], request)
    if results is None:
        return JSONResponse(anthropic_error_body(499, "the client closed the request"), status_code=499)
    result = results[0]
    content, calls = (split_tool_calls(result.text, prepared.tool_choice.parallel) if prepared.tool_choice.parses_calls
                      else (result.text, []))  # fmt: skip
    blocks = ([{"type": "text", "text": content}] if content or not calls else []) + [_tool_use(call) for call in calls]
    return {"id": request_id, "type": "message", "role": "assistant", "model": model, "content": blocks,
            **_stop(result, calls), "usage": _usage(result, state.engine.config.cache.enabled)}  # fmt: skip


def _tool_use(call: ToolCall) -> dict:
    return {"type": "tool_use", "id": call.id.replace("call_", "toolu_", 1), "name": call.name,
            "input": json.loads(call.arguments)}  # fmt: skip


def _stop(result: GenerationResult, calls: list) -> dict:
    if calls:
        return {"stop_reason": "tool_use", "stop_sequence": None}
    if result.stop_sequence is not None:
        return {"stop_reason": "stop_sequence", "stop_sequence": result.stop_sequence}
    return {"stop_reason": _STOP_REASONS.get(result.finish_reason, "end_turn"), "stop_sequence": None}


def _usage(result: GenerationResult, cache_on: bool) -> dict:
    prompt, read = result.num_prompt_tokens, result.num_cached_tokens
    written = prompt - read if cache_on else 0
    return {"input_tokens": prompt - read - written, "output_tokens": len(result.token_ids),
            "cache_read_input_tokens": read, "cache_creation_input_tokens": written}  # fmt: skip


def _event(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, separators=(',', ':'))}\n\n"


async def _stream(request_id: str, model: str, prepared: Prepared, probed_cached: int, events: AsyncIterator[StreamEvent],
                  cache_on: bool) -> AsyncIterator[str]:  # fmt: skip
    prompt = len(prepared.prompt_ids)
    written = prompt - probed_cached if cache_on else 0
    start_usage = {"input_tokens": prompt - probed_cached - written, "output_tokens": 0,
                   "cache_read_input_tokens": probed_cached, "cache_creation_input_tokens": written}  # fmt: skip
    yield _event("message_start", {"message": {"id": request_id, "type": "message", "role": "assistant", "model": model,
                                               "content": [], "stop_reason": None, "stop_sequence": None,
                                               "usage": start_usage}})  # fmt: skip
    calls = ToolCallStream(prepared.tool_choice.parallel) if prepared.tool_choice.parses_calls else None
    blocks = _Blocks()
    result: GenerationResult | None = None
    try:
        try:
            async for event in events:
                if event.result is not None:
                    result = event.result
                elif event.text:
                    for chunk in blocks.pieces([event.text] if calls is None else calls.push(event.text)):
                        yield chunk
            if calls is not None:
                for chunk in blocks.pieces(calls.flush()):
                    yield chunk
        except Exception as exc:  # noqa: BLE001 - headers are sent: the error goes into the stream
            yield _event("error", anthropic_error_body(500, f"generation failed ({type(exc).__name__}: {exc})"))
            return
        if result is None:
            yield _event("error", anthropic_error_body(500, "generation ended without a result"))
            return
        for chunk in blocks.close():
            yield chunk
        yield _event("message_delta", {"delta": _stop(result, calls.calls if calls else []),
                                       "usage": _usage(result, cache_on)})  # fmt: skip
        yield _event("message_stop", {})
    finally:
        await events.aclose()


class _Blocks:
    """The content blocks of a streamed answer: text deltas into an open text block, each tool call a block."""

    def __init__(self) -> None:
        self.index = -1
        self._text_open = False

    def pieces(self, pieces: list) -> list[str]:
        out = []
        for piece in pieces:
            if isinstance(piece, str):
                if not piece:
                    continue
                if not self._text_open:
                    self.index += 1
                    self._text_open = True
                    out.append(_event("content_block_start", {"index": self.index,
                                                              "content_block": {"type": "text", "text": ""}}))  # fmt: skip
                out.append(_event("content_block_delta", {"index": self.index,
                                                          "delta": {"type": "text_delta", "text": piece}}))  # fmt: skip
                continue
            out += self.close()
            self.index += 1
            block = _tool_use(piece)
            out.append(_event("content_block_start", {"index": self.index, "content_block": {**block, "input": {}}}))
            out.append(_event("content_block_delta", {"index": self.index, "delta": {
                "type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}}))
            out.append(_event("content_block_stop", {"index": self.index}))
        return out

    def close(self) -> list[str]:
        if not self._text_open:
            return []
        self._text_open = False
        return [_event("content_block_stop", {"index": self.index})]
