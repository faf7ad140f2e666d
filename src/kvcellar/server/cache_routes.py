"""Cache observability and administration.

Operations (routes): GET /v1/cache/stats (cumulative counters, 1 / 5 / 15
minute windows, optional history; global for an admin key, the tenant's own
namespace for a tenant key), POST /v1/cache/probe (how many tokens of
a prompt are cached, per tier, without running the model), POST
/v1/cache/clear (one tier or all; admin), POST /v1/cache/budget (a tier's
byte budget; admin), GET /v1/requests/recent, GET /metrics (Prometheus;
admin, unless the server runs with --metrics-public).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from kvcellar.cache.tier import check_known_tier
from kvcellar.config import parse_size
from kvcellar.engine.serving import ServingEngine
from kvcellar.errors import UnknownTierError
from kvcellar.server.auth import Tenant, current_tenant, metrics_reader, require_admin
from kvcellar.server.errors import APIError
from kvcellar.server.prepare import check_model, encode_input, prepare_prompt
from kvcellar.server.schemas import BudgetRequest, ClearRequest, ProbeRequest

router = APIRouter(tags=["cache"])
# Budgets, like every byte count the index and the metrics keep, are signed 64-bit integers.
MAX_BUDGET_BYTES = 2**63 - 1


def _tiers_json(engine: ServingEngine) -> dict:
    return {name: tier.as_json() for name, tier in engine.cache_report().tiers.items()}


def _check_tier(engine: ServingEngine, tier: str | None) -> None:
    try:
        check_known_tier(tier, engine.tier_names)
    except UnknownTierError as exc:
        raise APIError(400, str(exc), param="tier", code="unknown_tier") from None


@router.get("/v1/cache/stats")
async def cache_stats(request: Request, history: bool = Query(False, description="include the rate ring's snapshots"),
                      tenant: Tenant = Depends(current_tenant)) -> dict:  # fmt: skip
    """Cumulative cache counters, occupancy per tier and windowed rates over 1, 5 and 15 minutes.

    A tenant key gets its own namespace's figures (`scope: "tenant"`), an admin key everyone's (`"global"`)."""
    return await run_in_threadpool(request.app.state.telemetry.stats, tenant, history)


@router.post("/v1/cache/probe")
async def cache_probe(body: ProbeRequest, request: Request, tenant: Tenant = Depends(current_tenant)) -> dict:
    """How many tokens of these messages (or this prompt) the cache holds for your salt; runs no model."""
    engine = request.app.state.engine
    check_model(engine, body.model)
    if (body.messages is None) == (body.prompt is None):
        raise APIError(400, "send exactly one of 'messages' or 'prompt'", param="messages", code="invalid_request")

    def probe() -> dict:
        ids = encode_input(engine, messages=body.messages, prompt=body.prompt)
        param = "messages" if body.messages is not None else "prompt"
        found = engine.probe(prepared=prepare_prompt(engine, param, ids, cache_salt=tenant.salt_for(body.cache_salt)))
        return {"model": engine.model_name, "prompt_tokens": found.num_prompt_tokens,
                "cached_tokens": found.num_cached_tokens, "cached_tokens_by_tier": dict(found.tokens_by_tier),
                "uncached_tokens": found.num_prompt_tokens - found.num_cached_tokens}  # fmt: skip

    return await run_in_threadpool(probe)


@router.post("/v1/cache/clear")
async def cache_clear(request: Request, body: ClearRequest | None = None, tenant: Tenant = Depends(require_admin)) -> dict:
    """Drop every entry of one tier (`{"tier": "device"}`) or of all tiers (`{}`)."""
    engine = request.app.state.engine
    tier = body.tier if body is not None else None
    _check_tier(engine, tier)
    await run_in_threadpool(engine.clear_cache, tier)
    return {"cleared": [tier] if tier else list(engine.tier_names), "tiers": _tiers_json(engine)}


@router.post("/v1/cache/budget")
async def cache_budget(body: BudgetRequest, request: Request, tenant: Tenant = Depends(require_admin)) -> dict:
    """Set a tier's byte budget at run time; lowering it evicts at once."""
    engine = request.app.state.engine
    _check_tier(engine, body.tier)
    try:
        num_bytes = parse_size(body.budget)
    except ValueError as exc:
        raise APIError(400, str(exc), param="budget", code="invalid_size") from None
    if num_bytes > MAX_BUDGET_BYTES:
        raise APIError(400, f"budget {num_bytes} is over {MAX_BUDGET_BYTES} bytes (8 EiB), the most a tier can count",
                       param="budget", code="invalid_size")  # fmt: skip
    try:
        await run_in_threadpool(engine.set_cache_budget, body.tier, num_bytes)
    except ValueError as exc:  # a tier whose size is not kvcellar's to set (the remote tier: Redis's maxmemory)
        raise APIError(400, str(exc), param="tier", code="budget_not_settable") from None
    return {"tier": body.tier, "budget_bytes": num_bytes, "tiers": _tiers_json(engine)}


@router.get("/v1/requests/recent")
async def recent_requests(request: Request, limit: int = Query(50, ge=1, le=1000),
                          tenant: Tenant = Depends(current_tenant)) -> dict:  # fmt: skip
    """The newest finished requests, by completion order (yours only, for a tenant key): cached vs
    prefilled tokens, time in queue, TTFT from arrival and in the engine, finish reason (also "cancelled")."""
    records = request.app.state.telemetry.recent.newest(tenant.may_see, limit)
    return {"object": "list", "data": [record.as_json() for record in records]}


@router.get("/metrics", tags=["server"], response_class=Response)
async def metrics(request: Request, tenant: Tenant = Depends(metrics_reader)) -> Response:
    """Prometheus text format; global figures, so an admin key is needed unless the server runs with --metrics-public."""
    body, content_type = await run_in_threadpool(request.app.state.telemetry.metrics.render)
    return Response(body, media_type=content_type)
