"""The last N finished requests, for the dashboard and GET /v1/requests/recent.

Operations: `RequestRecord` (one finished request, as the engine measured
it), `RecentRequests.add` (numbers the record), `RecentRequests.newest(visible,
limit)`. Thread-safe; bounded (oldest dropped first).

Order: `seq` numbers records 1, 2, 3... in the order they finished (were
added); `newest` returns them by descending `seq`, never by a timestamp, so
the order is strict even when two requests end within a clock tick.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

FINISH_REASONS = ("stop", "length", "cancelled", "error")


@dataclass(frozen=True, kw_only=True)
class RequestRecord:
    """Times run from the request's arrival at the server (`created_s`), except `engine_ttft_s`.

    `queue_s`: arrival -> the engine starting the request (tokenizing, then waiting for the model).
    `ttft_s`: arrival -> the first generated token, as a client sees it; None when none was generated.
    `engine_ttft_s`: the engine starting the request -> the first token (restore + prefill + one sample).
    `total_s`: arrival -> the engine finishing. Token counts are as measured: a request cancelled
    during its prefill counts the prompt tokens computed before it stopped. A request that failed
    ("error") has no measured counts: `num_cached_tokens` and `num_prefilled_tokens` are None.
    """

    request_id: str
    endpoint: str  # "chat.completions" | "completions" | "messages"
    created_s: float  # unix time the request arrived
    tenant: str | None  # the key's bound salt, None for admins (and when no keys are set)
    stream: bool
    num_prompt_tokens: int
    num_cached_tokens: int | None
    num_prefilled_tokens: int | None
    num_completion_tokens: int
    finish_reason: str  # one of FINISH_REASONS
    queue_s: float
    ttft_s: float | None
    engine_ttft_s: float | None
    total_s: float
    cached_tokens_by_tier: dict[str, int] = field(default_factory=dict)
    # A chat turn that parted from its previous turn's tokens: ReuseBreak.as_json() (server/reuse_breaks.py)
    reuse_break: dict | None = None
    seq: int = 0  # completion order, set by RecentRequests.add
    finished_s: float = 0.0  # unix time it was recorded, set by RecentRequests.add

    def as_json(self) -> dict:
        data = dataclasses.asdict(self)
        del data["tenant"]  # never shown: a tenant's salt is a secret of its own
        return data


class RecentRequests:
    def __init__(self, capacity: int) -> None:
        self._records: deque[RequestRecord] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._num_total = 0

    def add(self, record: RequestRecord) -> RequestRecord:
        """Number the record (the next `seq`) and keep it; returns the numbered record."""
        with self._lock:
            self._num_total += 1
            numbered = dataclasses.replace(record, seq=self._num_total, finished_s=time.time())
            self._records.append(numbered)
        return numbered

    @property
    def num_total(self) -> int:
        return self._num_total

    def newest(self, visible: Callable[[str | None], bool], limit: int) -> list[RequestRecord]:
        """Newest first (descending `seq`), only records `visible(record.tenant)` accepts."""
        with self._lock:
            records = list(self._records)
        return [r for r in reversed(records) if visible(r.tenant)][:limit]
