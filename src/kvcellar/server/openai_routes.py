"""OpenAI-compatible endpoints: chat completions, completions (streamed or whole), models, health.

Operations (routes): POST /v1/chat/completions, POST /v1/completions,
GET /v1/models, GET /v1/models/{id}, GET and HEAD /health. A request is prepared in a worker thread
(tokenize, validate), queued to the engine at once, then either streamed as
server-sent events or collected whole; a client that disconnects cancels it.
"""

from __future__ import annotations

import time
from dataclasses import replace

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from kvcellar.engine.sampling import MAX_SEED
from kvcellar.server.auth import Tenant, current_tenant
from kvcellar.server.bridge import collect_results
from kvcellar.server.errors import error_body
from kvcellar.server.openai_stream import stream_chunks
from kvcellar.server.prepare import Prepared, check_model, prepare_generation
from kvcellar.server.logprobs import TokenText
from kvcellar.server.responses import completion_body
from kvcellar.server.schemas import ChatCompletionRequest, CompletionRequest
from kvcellar.server.telemetry import new_request_id
from kvcellar.tiers.remote.tier import RemoteTier

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
            "prefill_schedule": config.prefill_schedule, **_remote_health(engine)}  # fmt: skip


def _remote_health(engine) -> dict:
    """The shared tier's address (password hidden) and whether it is reachable; nothing when there is none."""
    for tier in engine.cache_registry.tiers:
        if isinstance(tier, RemoteTier):
            return {"remote_cache": {"url": tier.address.display, "connected": tier.is_up}}
    return {}


async def _generate(kind: str, body: ChatCompletionRequest | CompletionRequest, request: Request, tenant: Tenant):
    state = request.app.state
    created_s, arrived = time.time(), time.perf_counter()
    prepared = await run_in_threadpool(prepare_generation, state.engine, body, tenant, state.settings)
    endpoint, prefix = _ENDPOINTS[kind]
    request_id = new_request_id(prefix)
    # n choices are n engine requests queued together: the first prefills the prompt, the others find it
    # cached (a request looks the cache up when its prefill starts). Each gets its own record, recorded when
    # the engine is done with it (telemetry.py), also when the client left first.
    streams = []
    for index in range(body.n or 1):
        choice = prepared if index == 0 else _nth_choice(prepared, index)
        record_id = request_id if index == 0 else f"{request_id}-{index}"
        on_end = state.telemetry.recorder(record_id, endpoint, choice, stream=body.stream, created_s=created_s,
                                          arrived=arrived)  # fmt: skip
        streams.append(state.bridge.events(choice, on_end))
    header = (kind, request_id, int(created_s), state.engine.model_name)
    token_text = _token_text(state.engine.tokenizer)
    if body.stream:
        chunks = stream_chunks(header, streams, body.include_usage, token_text, prepared.tool_choice, prepared.reasoning)
        return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    results = await collect_results(streams, request)
    if results is None:  # the client is gone; this answer reaches nobody
        return JSONResponse(error_body(499, "the client closed the request"), status_code=499)
    return completion_body(*header, results, token_text, prepared.tool_choice, prepared.reasoning)


def _nth_choice(prepared: Prepared, index: int) -> Prepared:
    """Choice `index` of a request with n > 1: the same prompt, its own draws (a seeded request: seed + index)."""
    params = prepared.params
    seed = None if params.seed is None else (params.seed + index) % (MAX_SEED + 1)
    return replace(prepared, params=replace(params, seed=seed))


def _token_text(tokenizer: object) -> TokenText:
    """A token decoded alone, as log-probabilities name it."""
    return lambda token: tokenizer.decode([token])
