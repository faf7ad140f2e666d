"""The server's one observer: every finished request goes through `Telemetry.finish`.

Operations: `Telemetry.finish(...)` (recent list, Prometheus, the HIT / MISS
debug log line), `Telemetry.counters()` (engine cache counters plus the
server's request counters), `Telemetry.sample()` (feeds the rate windows),
`Telemetry.stats()` (the JSON of GET /v1/cache/stats).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

from kvcellar.engine import GenerationResult
from kvcellar.server.metrics import ServerMetrics
from kvcellar.server.prepare import Prepared
from kvcellar.server.rates import RateWindows
from kvcellar.server.recent import RecentRequests, RequestRecord
from kvcellar.server.settings import ServerSettings

log = logging.getLogger("kvcellar.server")


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class Telemetry:
    def __init__(self, engine: object, settings: ServerSettings) -> None:
        self._engine = engine
        self.metrics = ServerMetrics(engine)
        self.recent = RecentRequests(settings.num_recent_requests)
        self.rates = RateWindows(settings.rate_interval_s)
        self._lock = threading.Lock()
        self._num_completion_tokens = 0

    def finish(
        self, request_id: str, endpoint: str, prepared: Prepared, created_s: float, stream: bool,
        result: GenerationResult | None, num_streamed: int = 0,
    ) -> RequestRecord:  # fmt: skip
        """Record one request; `result` is None when the client left before the end (cancelled)."""
        if result is None:
            record = RequestRecord(request_id, endpoint, created_s, prepared.tenant.bound_salt, stream,
                                   len(prepared.prompt_ids), 0, num_streamed, "cancelled", None,
                                   time.time() - created_s)  # fmt: skip
        else:
            timings = result.timings
            record = RequestRecord(
                request_id, endpoint, created_s, prepared.tenant.bound_salt, stream,
                result.num_prompt_tokens, result.num_cached_tokens, len(result.token_ids), result.finish_reason,
                timings.ttft_s if result.token_ids else None, timings.total_s, dict(result.cached_tokens_by_tier),
            )  # fmt: skip
        with self._lock:
            self._num_completion_tokens += record.num_completion_tokens
        self.recent.add(record)
        self.metrics.observe(record)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s %s %s: %d/%d prompt tokens cached %s, %d generated, ttft %s, %s",
                "HIT" if record.num_cached_tokens else "MISS", request_id, endpoint, record.num_cached_tokens,
                record.num_prompt_tokens, record.cached_tokens_by_tier or "{}", record.num_completion_tokens,
                f"{record.ttft_s:.3f} s" if record.ttft_s is not None else "-", record.finish_reason,
            )  # fmt: skip
        return record

    def counters(self, cache: dict | None = None) -> dict[str, float]:
        cache = cache if cache is not None else self._engine.cache_stats()
        with self._lock:
            completion = self._num_completion_tokens
        return {**cache, "requests": self.recent.num_total, "completion_tokens": completion}

    def sample(self, force: bool = False) -> None:
        self.rates.sample(self.counters(), force)

    def stats(self, with_history: bool) -> dict:
        cache = self._engine.cache_stats()
        counters = self.counters(cache)
        self.rates.sample(counters)
        report = {**cache, "requests": counters["requests"], "completion_tokens": counters["completion_tokens"],
                  "queue_depth": self._engine.queue_depth, "model": self._engine.model_name,
                  "windows": self.rates.windows(counters)}  # fmt: skip
        if with_history:
            report["history"] = self.rates.history()
        return report
