"""Prometheus metrics, in a registry owned by one app (two apps in one process never clash).

Operations: `ServerMetrics(snapshot, batches)` (`snapshot()`: the global `ServerStats`; `batches()`: the
engine's decode batch-size histogram): `observe(record)` after each request,
`count_rejected(status)`, `render()` -> (body, content type) for GET
/metrics; `CountRejections` (ASGI middleware: every answer with a status of
400 or more, auth failures, validation errors and 500s included, goes to
`kvcellar_requests_rejected_total{status=...}`).

Request metrics are counted as requests finish; the time histograms run
from the request's arrival at the server (queue, TTFT as a client sees it,
whole request), plus the engine's own TTFT (queueing left out). Cache metrics (hit / miss /
saved tokens, evictions, bytes, budget and entries per tier, the shared tier's writes, loads, losses
and faults as kvcellar_remote_*) and the scheduler's (running and
waiting requests, their K/V against the budget, preemptions, decode batch sizes)
are read from the global `ServerStats` snapshot at scrape time by a
collector, so they can never drift from the engine's own counters or from
what GET /v1/cache/stats shows.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvcellar.cache.report import CacheReport, TierReport
from kvcellar.server.recent import RequestRecord
from kvcellar.server.stats import ServerStats

_TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# (metric name suffix, help, the global snapshot's value)
_CACHE_COUNTERS: tuple[tuple[str, str, Callable[[CacheReport], int]], ...] = (
    ("lookups", "prefix-cache lookups (one per request)", lambda r: r.num_lookups),
    ("hit_tokens", "prompt tokens restored from the cache", lambda r: r.num_hit_tokens),
    ("miss_tokens", "prompt tokens that had to be prefilled", lambda r: r.num_miss_tokens),
    ("saved_tokens", "prefill tokens the cache saved", lambda r: r.num_saved_tokens),
    ("evictions", "cache entries evicted", lambda r: r.num_evictions or 0),
)
_TIER_GAUGES: tuple[tuple[str, str, Callable[[TierReport], int]], ...] = (
    ("bytes", "bytes held by the tier", lambda t: t.num_bytes),
    ("budget_bytes", "byte budget of the tier", lambda t: t.budget_bytes),
    ("entries", "entries in the tier", lambda t: t.num_entries),
)

# The shared tier's own counters (tiers/remote: its TierStats counters), as kvcellar_remote_<name>_total.
_REMOTE_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("written", "num_written", "entries written to the shared tier"),
    ("dropped", "num_dropped", "entries not written to the shared tier (queue full, server down or full)"),
    ("loads", "num_loads", "entries loaded from the shared tier"),
    ("load_bytes", "load_bytes", "bytes loaded from the shared tier"),
    ("missing", "num_missing", "entries gone when loaded (evicted by the shared server)"),
    ("corrupt", "num_corrupt", "entries that failed their checks when loaded (deleted, a miss)"),
    ("oom", "num_oom", "writes the shared server refused for its maxmemory"),
    ("timeouts", "num_timeouts", "exchanges with the shared server that timed out"),
    ("connection_errors", "num_connection_errors", "exchanges with the shared server that failed to connect"),
    ("reconnects", "num_reconnects", "times the shared server became reachable again"),
)


class _CacheCollector:
    """Reads the server's global stats snapshot on every scrape."""

    def __init__(self, snapshot: Callable[[], ServerStats], batches: Callable[[], tuple]) -> None:
        self._snapshot = snapshot
        self._batches = batches

    def collect(self):
        stats = self._snapshot()
        cache = stats.cache
        for name, doc, value in _CACHE_COUNTERS:
            family = CounterMetricFamily(f"kvcellar_cache_{name}", doc)
            family.add_metric([], value(cache))
            yield family
        by_tier = CounterMetricFamily("kvcellar_cache_tier_hit_tokens", "prompt tokens restored, by the tier they came from",
                                      labels=["tier"])  # fmt: skip
        for tier, count in cache.hit_tokens_by_tier.items():
            by_tier.add_metric([tier], count)
        yield by_tier
        for name, doc, value in _TIER_GAUGES:
            family = GaugeMetricFamily(f"kvcellar_cache_tier_{name}", doc, labels=["tier"])
            for tier, report in cache.tiers.items():
                family.add_metric([tier], value(report))
            yield family
        for name, doc, value in (
            ("kvcellar_queue_depth", "requests waiting for the model (queued, waiting for K/V memory, or preempted)",
             stats.queue_depth),
            ("kvcellar_running_requests", "requests the model is running (prefilling or decoding)", stats.running),
            ("kvcellar_running_kv_tokens", "K/V tokens the running requests hold", stats.kv_tokens),
            ("kvcellar_kv_budget_tokens", "K/V tokens the running requests may hold together", stats.kv_budget_tokens),
        ):  # fmt: skip
            gauge = GaugeMetricFamily(name, doc)
            gauge.add_metric([], value)
            yield gauge
        remote = cache.tiers.get("remote")
        if remote is not None:
            up = GaugeMetricFamily("kvcellar_remote_up", "1 while the shared tier's server is reachable")
            up.add_metric([], remote.counters.get("connected", 0))
            yield up
            for name, counter, doc in _REMOTE_COUNTERS:
                family = CounterMetricFamily(f"kvcellar_remote_{name}", doc)
                family.add_metric([], remote.counters.get(counter, 0))
                yield family
        preemptions = CounterMetricFamily("kvcellar_preemptions", "running requests preempted for K/V memory")
        preemptions.add_metric([], stats.preemptions)
        yield preemptions
        buckets, _, total = self._batches()
        batch = HistogramMetricFamily("kvcellar_decode_batch_size", "requests fed by each decode forward pass")
        batch.add_metric([], [(str(bound) if bound != float("inf") else "+Inf", count) for bound, count in buckets], total)
        yield batch


class ServerMetrics:
    def __init__(self, snapshot: Callable[[], ServerStats], batches: Callable[[], tuple]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_CacheCollector(snapshot, batches))
        labels = ["endpoint", "finish_reason"]
        self._requests = Counter("kvcellar_requests", "finished generation requests", labels, registry=self.registry)
        self._prompt = Counter("kvcellar_prompt_tokens", "prompt tokens of finished requests", ["endpoint"],
                               registry=self.registry)  # fmt: skip
        self._cached = Counter("kvcellar_request_cached_tokens", "prompt tokens served from the cache, by tier",
                               ["tier"], registry=self.registry)  # fmt: skip
        self._completion = Counter("kvcellar_completion_tokens", "generated tokens", ["endpoint"], registry=self.registry)
        self._reuse_breaks = Counter("kvcellar_chat_reuse_breaks", "chat turns whose prompt parted from their previous "
                                     "turn's tokens before its end (server/reuse_breaks.py)", ["endpoint"],
                                     registry=self.registry)  # fmt: skip
        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, ["endpoint"], buckets=_TTFT_BUCKETS_S, registry=self.registry)

        self._queue = histogram("kvcellar_queue_seconds", "arrival at the server to the engine starting the request")
        self._ttft = histogram("kvcellar_ttft_seconds", "arrival at the server to the first token (as a client sees it)")
        self._engine_ttft = histogram("kvcellar_engine_ttft_seconds", "engine start to the first token (queueing excluded)")
        self._latency = histogram("kvcellar_request_seconds", "arrival at the server to the end of generation")
        self._rejected = Counter("kvcellar_requests_rejected", "answers with an HTTP status of 400 or more, by status",
                                 ["status"], registry=self.registry)  # fmt: skip

    def observe(self, record: RequestRecord) -> None:
        self._requests.labels(record.endpoint, record.finish_reason).inc()
        self._prompt.labels(record.endpoint).inc(record.num_prompt_tokens)
        self._completion.labels(record.endpoint).inc(record.num_completion_tokens)
        for tier, count in record.cached_tokens_by_tier.items():
            self._cached.labels(tier).inc(count)
        self._queue.labels(record.endpoint).observe(record.queue_s)
        if record.ttft_s is not None:
            self._ttft.labels(record.endpoint).observe(record.ttft_s)
            self._engine_ttft.labels(record.endpoint).observe(record.engine_ttft_s)
        self._latency.labels(record.endpoint).observe(record.total_s)
        if record.reuse_break is not None:
            self._reuse_breaks.labels(record.endpoint).inc()

    def count_rejected(self, status: int) -> None:
        self._rejected.labels(str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class CountRejections:
    """ASGI middleware: counts every HTTP answer whose status is 400 or more.

    It sits inside Starlette's outermost error middleware, which turns an unhandled exception into
    the 500 answer: an exception passing through here before any answer started is counted as 500.
    """

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self._app = app
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if message["status"] >= 400:
                    self._metrics.count_rejected(message["status"])
            await send(message)

        try:
            await self._app(scope, receive, watch)
        except Exception:
            if not started:
                self._metrics.count_rejected(500)
            raise
