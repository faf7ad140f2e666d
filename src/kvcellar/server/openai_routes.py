"""OpenAI-compatible endpoints: chat completions, completions (streamed or whole), models, health.

Operations (routes): POST /v1/chat/completions, POST /v1/completions,
GET /v1/models, GET /v1/models/{id}, GET and HEAD /health. A request is prepared in a worker thread
(tokenize, validate), queued to the engine at once, then either streamed as
server-sent events or collected whole; a client that disconnects cancels it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from kvcellar.chat.tool_calls import ToolCallStream
from kvcellar.chat.tools import ToolChoice
from kvcellar.engine import GenerationResult, StreamEvent
from kvcellar.server.auth import Tenant, current_tenant
from kvcellar.server.bridge import collect_result
from kvcellar.server.errors import error_body
from kvcellar.server.prepare import check_model, prepare_generation
from kvcellar.server.logprobs import TokenText
from kvcellar.server.responses import chunk_body, completion_body, finish_reason, render_logprobs, sse, usage_chunk
from kvcellar.server.schemas import ChatCompletionRequest, CompletionRequest
from kvcellar.server.telemetry import new_request_id

router = APIRouter()
_ENDPOINTS = {"chat": ("chat.completions", "chatcmpl"), "text": ("completions", "cmpl")}


@router.post("/v1/chat/completions", tags=["openai"])
async def chat_completions(body: ChatCompletionRequest, request: Request, tenant: Tenant = Depends(current_tenant)):
    """Chat completion; `usage.prompt_tokens_details` tells how many prompt tokens came from the cache."""
    return await _generate("chat", body, request, tenant)


@router.post("/v1/completions", tags=["openai"])
async def completions(body: CompletionRequest, request: Request, tenant: Tenant = Depends(current_tenant)):
    """Text completion of a prompt (text, a list of one text, or token ids)."""
    return await _generate("text", body, request, tenant)


def _model_object(state: object) -> dict:
    return {"id": state.engine.model_name, "object": "model", "created": int(state.started_s), "owned_by": "kvcellar",
            "context_length": state.engine.context_length}  # fmt: skip


@router.get("/v1/models", tags=["openai"])
async def list_models(request: Request, tenant: Tenant = Depends(current_tenant)) -> dict:
    return {"object": "list", "data": [_model_object(request.app.state)]}


@router.get("/v1/models/{model_id:path}", tags=["openai"])
async def retrieve_model(model_id: str, request: Request, tenant: Tenant = Depends(current_tenant)) -> dict:
    """The served model (ids may contain '/'); any other id is a 404 `model_not_found`."""
    check_model(request.app.state.engine, model_id)
    return _model_object(request.app.state)


@router.get("/health", tags=["server"])
@router.head("/health", tags=["server"], operation_id="health_head")  # an operation of its own: ids must be unique
async def health(request: Request, tenant: Tenant = Depends(current_tenant)) -> dict:
    engine = request.app.state.engine
    config = engine.config
    load = engine.load_report()
    return {"status": "ok", "model": engine.model_name, "queue_depth": engine.queue_depth, "running": load.running,
            "kv_tokens": load.kv_tokens, "kv_budget_tokens": load.kv_budget_tokens,
            "device": str(engine.loaded.device), "dtype": engine.loaded.precision, "block_size": config.block_size, "prefill_chunk_size": config.prefill_chunk_size,
            "prefill_schedule": config.prefill_schedule}  # fmt: skip


async def _generate(kind: str, body: ChatCompletionRequest | CompletionRequest, request: Request, tenant: Tenant):
    state = request.app.state
    created_s, arrived = time.time(), time.perf_counter()
    prepared = await run_in_threadpool(prepare_generation, state.engine, body, tenant, state.settings)
    endpoint, prefix = _ENDPOINTS[kind]
    request_id = new_request_id(prefix)
    # Recorded when the engine is done with it (telemetry.py), also when the client left first.
    on_end = state.telemetry.recorder(request_id, endpoint, prepared, stream=body.stream, created_s=created_s,
                                      arrived=arrived)  # fmt: skip
    events = state.bridge.events(prepared, on_end)
    header = (kind, request_id, int(created_s), state.engine.model_name)
    token_text = _token_text(state.engine.tokenizer)
    if body.stream:
        chunks = _stream_chunks(header, events, body.include_usage, token_text, prepared.tool_choice)
        return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    result = await collect_result(events, request)
    if result is None:  # the client is gone; this answer reaches nobody
        return JSONResponse(error_body(499, "the client closed the request"), status_code=499)
    return completion_body(*header, result, token_text, prepared.tool_choice)


def _tool_stream_chunks(header: tuple, pieces: list, logprobs: dict | None, calls: ToolCallStream,
                        every_token: bool = True) -> list[str]:  # fmt: skip
    """The chunks of one token's pieces (content text, whole tool calls); a token whose text is held back
    (it may open a tool call) still gets its chunk, empty, to carry its log-probability."""
    chunks = []
    for piece in pieces:
        if isinstance(piece, str):
            chunks.append(sse(chunk_body(*header, piece, logprobs=logprobs)))
        else:
            chunks.append(sse(chunk_body(*header, None, logprobs=logprobs,
                                         tool_call=piece.as_openai(calls.calls.index(piece)))))  # fmt: skip
        logprobs = None
    if not chunks and every_token:
        chunks.append(sse(chunk_body(*header, "", logprobs=logprobs)))
    return chunks


def _token_text(tokenizer: object) -> TokenText:
    """A token decoded alone, as log-probabilities name it."""
    return lambda token: tokenizer.decode([token])


async def _stream_chunks(header: tuple, events: AsyncIterator[StreamEvent], include_usage: bool,
                         token_text: TokenText, tool_choice: ToolChoice) -> AsyncIterator[str]:  # fmt: skip
    kind = header[0]
    result: GenerationResult | None = None
    offset = 0  # where the next token's text starts in the answer (completions' text_offset)
    calls = ToolCallStream(tool_choice.parallel) if tool_choice.parses_calls else None
    try:
        if kind == "chat":
            yield sse(chunk_body(*header, "", first=True))
        try:
            async for event in events:
                if event.result is not None:
                    result = event.result
                elif event.text or event.token_id is not None:  # one chunk per token, as OpenAI's and vLLM's
                    logprobs = None  # (text empty while a character is incomplete)
                    if event.logprob is not None:
                        logprobs = render_logprobs(kind, [event.logprob], token_text, offset)
                        offset += len(token_text(event.logprob.token_id))
                    if calls is None:
                        yield sse(chunk_body(*header, event.text, logprobs=logprobs))
                        continue
                    for chunk in _tool_stream_chunks(header, calls.push(event.text), logprobs, calls):
                        yield chunk
            if calls is not None:
                for chunk in _tool_stream_chunks(header, calls.flush(), None, calls, every_token=False):
                    yield chunk
        except Exception as exc:  # noqa: BLE001 - headers are sent: the error goes into the stream
            yield sse(error_body(500, f"generation failed ({type(exc).__name__}: {exc})"))
            return
        if result is None:
            yield sse(error_body(500, "generation ended without a result"))
            return
        finish = "tool_calls" if calls is not None and calls.calls else finish_reason(result)
        yield sse(chunk_body(*header, None, finish))
        if include_usage:
            yield sse(usage_chunk(*header, result))
        yield sse("[DONE]")
    finally:
        await events.aclose()
