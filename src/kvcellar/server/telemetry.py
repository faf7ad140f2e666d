"""The server's one observer: every request the engine ran goes through `Telemetry.finish`.

Operations: `Telemetry.recorder(...)` (the `on_end` callback of one request:
it records the engine's result when the engine is done, also for a request
whose client left), `Telemetry.finish` (recent list, Prometheus, the HIT /
MISS debug log line), `Telemetry.snapshot(tenant)` (the one place a
`ServerStats` is built; the Prometheus collector reads it too),
`Telemetry.sample()` (feeds the rate windows), `Telemetry.stats(tenant,
history)` (the JSON of GET /v1/cache/stats).

Scope: an admin (or anyone, with no keys set) sees the global figures; a
tenant key sees its own namespace's: its cache counters and entries
(`ServingEngine.cache_report(salts)`), its requests, its generated tokens and rate
windows of its own (one ring per tenant salt configured).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable

from kvcellar.engine import GenerationResult
from kvcellar.engine.serving import ServingEngine
from kvcellar.server.auth import Tenant
from kvcellar.server.metrics import ServerMetrics
from kvcellar.server.prepare import Prepared
from kvcellar.server.rates import TENANT_RATE_COUNTERS, RateWindows
from kvcellar.server.recent import RecentRequests, RequestRecord
from kvcellar.server.reuse_breaks import TurnTracker
from kvcellar.server.stats import ServerStats
from kvcellar.config import ServerSettings

log = logging.getLogger("kvcellar.server")
CHAT_ENDPOINTS = ("chat.completions", "messages")  # whose turns the reuse-break tracker follows


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def build_record(
    request_id: str, endpoint: str, prepared: Prepared, *, stream: bool, created_s: float, waited_s: float,
    result: GenerationResult | None, error: BaseException | None,
) -> RequestRecord:  # fmt: skip
    """The record of one request. `waited_s`: arrival -> the request queued in the engine (tokenizing)."""
    request = dict(request_id=request_id, endpoint=endpoint, created_s=created_s, tenant=prepared.tenant.bound_salt,
                   stream=stream)  # fmt: skip
    if result is None:  # the engine raised: nothing it measured came back
        return RequestRecord(
            **request, num_prompt_tokens=len(prepared.prompt_ids), num_cached_tokens=None, num_prefilled_tokens=None,
            num_completion_tokens=0, finish_reason="error" if error is not None else "cancelled", queue_s=waited_s,
            ttft_s=None, engine_ttft_s=None, total_s=waited_s,
        )  # fmt: skip
    timings = result.timings
    queue_s = waited_s + timings.queue_s
    generated = bool(result.token_ids)
    return RequestRecord(
        **request, num_prompt_tokens=result.num_prompt_tokens, num_cached_tokens=result.num_cached_tokens,
        num_prefilled_tokens=timings.num_prefill_tokens, num_completion_tokens=len(result.token_ids),
        finish_reason=result.finish_reason, queue_s=queue_s,
        ttft_s=queue_s + timings.ttft_s if generated else None, engine_ttft_s=timings.ttft_s if generated else None,
        total_s=queue_s + timings.total_s, cached_tokens_by_tier=dict(result.cached_tokens_by_tier),
    )  # fmt: skip


class Telemetry:
    def __init__(self, engine: ServingEngine, settings: ServerSettings) -> None:
        self._engine = engine
        self.metrics = ServerMetrics(self.snapshot, engine.decode_batches.snapshot)
        self.recent = RecentRequests(settings.num_recent_requests)
        self.rates = RateWindows(settings.rate_interval_s)
        self._tenant_rates = {salt: RateWindows(settings.rate_interval_s, counters=TENANT_RATE_COUNTERS)
                              for salt in set(settings.api_keys.values()) if salt is not None}  # fmt: skip
        self._lock = threading.Lock()
        self._num_requests: Counter[str | None] = Counter()  # by the key's bound salt (None: admins)
        self._num_completion_tokens: Counter[str | None] = Counter()
        self.turns = TurnTracker()

    def _decode(self, ids: list[int]) -> str:
        return self._engine.tokenizer.decode(ids)

    def recorder(
        self, request_id: str, endpoint: str, prepared: Prepared, *, stream: bool, created_s: float, arrived: float
    ) -> Callable[[GenerationResult | None, BaseException | None], None]:
        """The `on_end` of a request about to be queued; `arrived`: its `time.perf_counter()` at arrival."""
        waited_s = time.perf_counter() - arrived

        def on_end(result: GenerationResult | None, error: BaseException | None) -> None:
            try:
                record = build_record(request_id, endpoint, prepared, stream=stream, created_s=created_s,
                                      waited_s=waited_s, result=result, error=error)  # fmt: skip
                if endpoint in CHAT_ENDPOINTS and result is not None:
                    found = self.turns.observe(prepared.cache_salt, prepared.prompt_ids, result.token_ids,
                                               prepared.prompt.segments.system_end, self._decode)  # fmt: skip
                    record = dataclasses.replace(record, reuse_break=found.as_json() if found else None)
                self.finish(record)
            except Exception:  # noqa: BLE001 - on the pump thread: a bad record must not lose the next ones
                log.exception("could not record request %s", request_id)

        return on_end

    def finish(self, record: RequestRecord) -> RequestRecord:
        with self._lock:
            self._num_requests[record.tenant] += 1
            self._num_completion_tokens[record.tenant] += record.num_completion_tokens
        record = self.recent.add(record)
        self.metrics.observe(record)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s %s %s: %s/%d prompt tokens cached %s, %d generated, queue %.3f s, ttft %s, %s",
                "HIT" if record.num_cached_tokens else "MISS", record.request_id, record.endpoint, record.num_cached_tokens,
                record.num_prompt_tokens, record.cached_tokens_by_tier or "{}", record.num_completion_tokens,
                record.queue_s, f"{record.ttft_s:.3f} s" if record.ttft_s is not None else "-", record.finish_reason,
            )  # fmt: skip
        return record

    def snapshot(self, tenant: Tenant | None = None) -> ServerStats:
        """The figures of a scope: everything (None or an admin key), or a tenant key's own namespace."""
        own = tenant is not None and not tenant.is_admin
        cache = self._engine.cache_report(tenant.owns_salt) if own else self._engine.cache_report()
        with self._lock:
            if own:
                requests, completion = self._num_requests[tenant.bound_salt], self._num_completion_tokens[tenant.bound_salt]
            else:
                requests, completion = sum(self._num_requests.values()), sum(self._num_completion_tokens.values())
        load = self._engine.load_report()
        return ServerStats(cache=cache, num_requests=requests, num_completion_tokens=completion, is_tenant=own,
                           queue_depth=self._engine.queue_depth, running=load.running, kv_tokens=load.kv_tokens,
                           kv_budget_tokens=load.kv_budget_tokens, preemptions=load.preemptions,
                           model=self._engine.model_name)  # fmt: skip

    def _windows_of(self, tenant: Tenant | None) -> RateWindows:
        return self.rates if tenant is None or tenant.is_admin else self._tenant_rates[tenant.bound_salt]

    def sample(self, force: bool = False) -> None:
        self.rates.sample(self.snapshot().rate_counters(), force)
        for salt, rates in self._tenant_rates.items():
            rates.sample(self.snapshot(Tenant(salt)).rate_counters(), force)

    def stats(self, tenant: Tenant, with_history: bool) -> dict:
        """The body of GET /v1/cache/stats for `tenant`'s scope."""
        snapshot = self.snapshot(tenant)
        counters = snapshot.rate_counters()
        rates = self._windows_of(tenant)
        rates.sample(counters)
        return snapshot.as_json(rates.windows(counters), rates.history() if with_history else None)
