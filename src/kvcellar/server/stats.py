"""One scope's figures at one moment: the server's typed stats snapshot.

Operations: `ServerStats` (built only by `Telemetry.snapshot(tenant)`),
`.rate_counters()` (the cumulative counters the rate windows keep),
`.as_json(windows, history)` (the body of GET /v1/cache/stats, which the
dashboard draws; docs/api.md documents it). The Prometheus collector reads
the global snapshot's fields, so every figure the server shows comes from
this one object.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcellar.cache.report import CacheReport


@dataclass(frozen=True, kw_only=True)
class ServerStats:
    cache: CacheReport  # a namespace report for a tenant key, the whole cache's otherwise
    num_requests: int  # finished generation requests in this scope
    num_completion_tokens: int
    is_tenant: bool  # the scope: one tenant's namespace, or everything ("global")
    queue_depth: int  # requests waiting for the model (all tenants': the queue is shared)
    running: int  # requests the model is running (prefilling or decoding), all tenants'
    kv_tokens: int  # K/V tokens the running requests hold
    kv_budget_tokens: int  # what they may hold together (--kv-budget)
    preemptions: int  # running requests preempted for memory since the start
    model: str

    def rate_counters(self) -> dict[str, float]:
        """The cumulative counters the 1 / 5 / 15 minute windows difference (server/rates.py's names)."""
        cache = self.cache
        counters = {"requests": self.num_requests, "lookups": cache.num_lookups, "hit_tokens": cache.num_hit_tokens,
                    "miss_tokens": cache.num_miss_tokens, "saved_tokens": cache.num_saved_tokens}  # fmt: skip
        if cache.num_evictions is not None:
            counters["evictions"] = cache.num_evictions
        counters["completion_tokens"] = self.num_completion_tokens
        return counters

    def as_json(self, windows: dict[str, dict[str, float]], history: list[dict[str, float]] | None = None) -> dict:
        report = {**self.cache.as_json(), "requests": self.num_requests, "completion_tokens": self.num_completion_tokens,
                  "scope": "tenant" if self.is_tenant else "global", "queue_depth": self.queue_depth, "running": self.running,
                  "kv_tokens": self.kv_tokens, "kv_budget_tokens": self.kv_budget_tokens, "preemptions": self.preemptions,
                  "model": self.model,
                  "windows": windows}  # fmt: skip
        if history is not None:
            report["history"] = history
        return report
