"""Where benchmark requests go: an in-process engine, or a running `kvcellar serve` over HTTP.

Operations: `Sample` (what one request measured), `EngineTarget.send`,
`HttpTarget.send` / `.describe`. The hand-written transformers baseline is
in `handwritten.py` and speaks the same `send(request, salt) -> Sample`.

Timing: in-process, TTFT and its split (lookup / restore / prefill of the
rest) come from the engine's own `Timings`; over HTTP, TTFT is the arrival of
the first streamed chunk at the client, and the split is the server's
`timings` object from the final usage chunk.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from kvcellar.bench.scenarios import BenchRequest


@dataclass(frozen=True, slots=True)
class Sample:
    label: str
    kind: str
    num_prompt_tokens: int
    num_cached_tokens: int
    ttft_s: float
    total_s: float
    lookup_s: float = 0.0
    restore_s: float = 0.0
    prefill_s: float = 0.0
    num_prefill_tokens: int = 0
    cached_tokens_by_tier: dict[str, int] = field(default_factory=dict)


class EngineTarget:
    """A kvcellar Engine in this process. `prepare` runs before every request (tier forcing)."""

    def __init__(self, engine: object, max_tokens: int, prepare: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self._max_tokens = max_tokens
        self._prepare = prepare

    def send(self, request: BenchRequest, salt: str) -> Sample:
        if self._prepare is not None:
            self._prepare()
        started = time.perf_counter()
        result = self.engine.generate(prompt_ids=list(request.ids), max_tokens=self._max_tokens, ignore_eos=True,
                                      cache_salt=salt)  # fmt: skip
        wall_s = time.perf_counter() - started
        t = result.timings
        return Sample(request.label, request.kind, result.num_prompt_tokens, result.num_cached_tokens,
                      t.ttft_s, max(t.total_s, wall_s), t.lookup_s, t.restore_s, t.prefill_s, t.num_prefill_tokens,
                      dict(result.cached_tokens_by_tier))  # fmt: skip

    def close(self) -> None:
        self.engine.close()
        # Flush and release the tiers (disk writer thread, directory lock) before the process ends:
        # a writer thread still alive at exit can abort the process. Idempotent.
        close_tiers = getattr(getattr(self.engine, "cache_registry", None), "close", None)
        if close_tiers is not None:
            close_tiers()


class HttpTarget:
    """POST /v1/completions (token-id prompts, streamed, usage included) on a running server."""

    def __init__(self, url: str, max_tokens: int, api_key: str | None = None, timeout_s: float = 3600.0) -> None:
        parts = urlsplit(url)
        self._https = parts.scheme == "https"
        self._netloc = parts.netloc
        self._base = parts.path.rstrip("/").removesuffix("/v1")
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._max_tokens = max_tokens
        self._timeout_s = timeout_s

    def _connection(self) -> http.client.HTTPConnection:
        kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return kind(self._netloc, timeout=self._timeout_s)

    def _get(self, path: str) -> dict:
        conn = self._connection()
        try:
            conn.request("GET", self._base + path, headers=self._headers)
            response = conn.getresponse()
            body = response.read()
            if response.status != 200:
                raise RuntimeError(f"GET {path} answered {response.status}: {body[:300]!r}")
            return json.loads(body)
        finally:
            conn.close()

    def describe(self) -> dict:
        """The served model and the server's health, for the results' header."""
        models = self._get("/v1/models").get("data", [])
        return {"url": f"{'https' if self._https else 'http'}://{self._netloc}{self._base}",
                "model": models[0] if models else None, "health": self._get("/health")}  # fmt: skip

    def send(self, request: BenchRequest, salt: str) -> Sample:
        body = {"prompt": list(request.ids), "max_tokens": self._max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}, "cache_salt": salt}  # fmt: skip
        conn = self._connection()
        try:
            started = time.perf_counter()
            conn.request("POST", self._base + "/v1/completions", json.dumps(body), self._headers)
            response = conn.getresponse()
            if response.status != 200:
                raise RuntimeError(f"POST /v1/completions answered {response.status}: {response.read()[:500]!r}")
            ttft_s, usage, timings = self._read_stream(response, started)
            total_s = time.perf_counter() - started
        finally:
            conn.close()
        if usage is None:
            raise RuntimeError("the server's stream ended without a usage chunk (stream_options.include_usage)")
        details = usage.get("prompt_tokens_details") or {}
        return Sample(request.label, request.kind, usage["prompt_tokens"], details.get("cached_tokens", 0),
                      ttft_s, total_s, timings.get("lookup_s", 0.0), timings.get("restore_s", 0.0),
                      timings.get("prefill_s", 0.0), usage["prompt_tokens"] - details.get("cached_tokens", 0),
                      dict(details.get("cached_tokens_by_tier") or {}))  # fmt: skip

    @staticmethod
    def _read_stream(response: http.client.HTTPResponse, started: float) -> tuple[float, dict | None, dict]:
        ttft_s, usage, timings = None, None, {}
        for raw in response:  # server-sent events, one "data: ..." line each
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            if ttft_s is None:
                ttft_s = time.perf_counter() - started
            payload = line[len("data:"):].strip()
            if payload == "[DONE]":
                break
            chunk = json.loads(payload)
            if "error" in chunk:
                raise RuntimeError(f"the server reported an error mid-stream: {chunk['error']}")
            if chunk.get("usage"):
                usage, timings = chunk["usage"], chunk.get("timings") or {}
        if ttft_s is None:
            raise RuntimeError("the server's stream sent no data")
        return ttft_s, usage, timings

    def close(self) -> None:
        """Nothing held: each request opens its own connection."""
