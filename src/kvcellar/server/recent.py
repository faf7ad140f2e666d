"""The last N finished requests, for the dashboard and GET /v1/requests/recent.

Operations: `RequestRecord` (one finished request), `RecentRequests.add`,
`RecentRequests.newest(visible, limit)`. Thread-safe; bounded (oldest dropped first).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class RequestRecord:
    request_id: str
    endpoint: str  # "chat.completions" | "completions"
    created_s: float  # unix time the request arrived
    tenant: str | None  # the key's bound salt, None for admins (and when no keys are set)
    stream: bool
    num_prompt_tokens: int
    num_cached_tokens: int
    num_completion_tokens: int
    finish_reason: str  # "stop" | "length" | "cancelled"
    ttft_s: float | None  # None when no token was produced
    total_s: float
    cached_tokens_by_tier: dict[str, int] = field(default_factory=dict)

    @property
    def num_prefilled_tokens(self) -> int:
        return self.num_prompt_tokens - self.num_cached_tokens

    def as_json(self) -> dict:
        data = asdict(self)
        del data["tenant"]  # never shown: a tenant's salt is a secret of its own
        data["num_prefilled_tokens"] = self.num_prefilled_tokens
        return data


class RecentRequests:
    def __init__(self, capacity: int) -> None:
        self._records: deque[RequestRecord] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._num_total = 0

    def add(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)
            self._num_total += 1

    @property
    def num_total(self) -> int:
        return self._num_total

    def newest(self, visible: Callable[[str | None], bool], limit: int) -> list[RequestRecord]:
        """Newest first, only records `visible(record.tenant)` accepts."""
        with self._lock:
            records = list(self._records)
        return [r for r in reversed(records) if visible(r.tenant)][:limit]
