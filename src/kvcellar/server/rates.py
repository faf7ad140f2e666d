"""Windowed rates over 1 / 5 / 15 minutes from a small ring of counter snapshots.

Operations: `RateWindows(interval_s, horizon_s, counters=RATE_COUNTERS)`,
`RateWindows.sample(counters, force=False)` (keep a snapshot when
`interval_s` has passed since the last one), `RateWindows.windows(current)`
(per window: deltas, hit rate, per-second rates), `RateWindows.history()`.
The ring holds `horizon_s / interval_s + 1` snapshots, so memory is fixed.
Counters are cumulative and never decrease; a window younger than its
length reports the span it really covers (`span_s`).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

WINDOWS_S = {"1m": 60.0, "5m": 300.0, "15m": 900.0}
RATE_COUNTERS = ("requests", "lookups", "hit_tokens", "miss_tokens", "saved_tokens", "evictions", "completion_tokens")
# A tenant's windows: evictions happen in the shared tiers and are not a tenant's figure.
TENANT_RATE_COUNTERS = tuple(name for name in RATE_COUNTERS if name != "evictions")


class RateWindows:
    def __init__(
        self, interval_s: float = 5.0, horizon_s: float = 900.0, clock: Callable[[], float] = time.time,
        counters: tuple[str, ...] = RATE_COUNTERS,
    ) -> None:  # fmt: skip
        self._interval_s = interval_s
        self._names = counters
        self._clock = clock
        self._ring: deque[tuple[float, dict[str, float]]] = deque(maxlen=int(horizon_s / interval_s) + 2)
        self._lock = threading.Lock()

    def sample(self, counters: dict[str, float], force: bool = False) -> None:
        now = self._clock()
        with self._lock:
            if force or not self._ring or now - self._ring[-1][0] >= self._interval_s:
                self._ring.append((now, {name: counters.get(name, 0) for name in self._names}))

    def windows(self, current: dict[str, float]) -> dict[str, dict[str, float]]:
        now = self._clock()
        with self._lock:
            ring = list(self._ring)
        return {name: _window(ring, now, length_s, current, self._names) for name, length_s in WINDOWS_S.items()}

    def history(self) -> list[dict[str, float]]:
        """Every kept snapshot, oldest first: {"time_s": unix time, counter: value, ...}."""
        with self._lock:
            return [{"time_s": t, **values} for t, values in self._ring]


def _window(
    ring: list[tuple[float, dict[str, float]]], now: float, length_s: float, current: dict[str, float], names: tuple[str, ...]
) -> dict:  # fmt: skip
    # The oldest snapshot inside the window; if none is, the newest one before it is still the best base.
    base = next(((t, v) for t, v in ring if now - t <= length_s), ring[-1] if ring else (now, {}))
    span_s = now - base[0]
    deltas = {name: max(0, current.get(name, 0) - base[1].get(name, 0)) for name in names}
    looked_up = deltas["hit_tokens"] + deltas["miss_tokens"]
    return {
        "span_s": span_s,
        **deltas,
        "hit_rate": deltas["hit_tokens"] / looked_up if looked_up else 0.0,
        "requests_per_s": deltas["requests"] / span_s if span_s > 0 else 0.0,
        "saved_tokens_per_s": deltas["saved_tokens"] / span_s if span_s > 0 else 0.0,
    }
