"""Restore or recompute: the cost model that keeps a hit from being slower than a miss.

Operations: `CostModel.record_prefill`, `.record_load`, `.plan`, `.snapshot`.

Loading a prefix from a slow tier is not always faster than computing it
again (a small model on a fast GPU prefills faster than many disks read its
KV). The model keeps exponentially weighted rates, measured while serving:
prefill tokens per second, and load bytes per second per tier. `plan` takes
the entries a lookup found, in chain order, and returns how many of the
leading ones to restore so that the estimated time to reach the prompt's end
(load the chosen entries + prefill the rest) is smallest. Entries in a tier
with no measured bandwidth yet are assumed worth loading: the first load
measures it. Torch-free: rates are plain floats.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

# Weight of a new sample in the moving averages: recent enough to follow load, smooth enough to ignore one outlier.
SMOOTHING = 0.3


@dataclass(frozen=True)
class Segment:
    """One entry found by a lookup: where it lives, its size, how many prompt tokens it covers."""

    tier_name: str
    num_bytes: int
    num_tokens: int


class CostModel:
    def __init__(self, smoothing: float = SMOOTHING) -> None:
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1] (got {smoothing})")
        self._smoothing = smoothing
        self._prefill_tokens_per_s: float | None = None
        self._load_bytes_per_s: dict[str, float] = {}
        self._lock = threading.Lock()

    def _blend(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self._smoothing) * old + self._smoothing * new

    def record_prefill(self, num_tokens: int, seconds: float) -> None:
        if num_tokens > 0 and seconds > 0:
            with self._lock:
                self._prefill_tokens_per_s = self._blend(self._prefill_tokens_per_s, num_tokens / seconds)

    def record_load(self, tier_name: str, num_bytes: int, seconds: float) -> None:
        if num_bytes > 0 and seconds > 0:
            with self._lock:
                old = self._load_bytes_per_s.get(tier_name)
                self._load_bytes_per_s[tier_name] = self._blend(old, num_bytes / seconds)

    def plan(self, segments: Sequence[Segment], num_rest_tokens: int) -> int:
        """How many leading `segments` to restore; `num_rest_tokens` must be prefilled whatever we choose.

        Estimated time with the first j segments restored:
            sum(load time of segments[:j]) + (tokens of segments[j:] + num_rest_tokens) / prefill rate.
        Ties keep the longer restore (fewer tokens to compute, less energy).
        """
        with self._lock:
            rate = self._prefill_tokens_per_s
            bandwidth = dict(self._load_bytes_per_s)
        if rate is None:
            return len(segments)  # nothing measured yet: restoring is the better bet
        best_count, best_time = 0, sum(s.num_tokens for s in segments) / rate
        elapsed_load = 0.0
        remaining = sum(s.num_tokens for s in segments)
        for count, segment in enumerate(segments, start=1):
            tier_rate = bandwidth.get(segment.tier_name)
            # A 0-token entry carries only the prompt's next-token logits: without it the last block
            # must be recomputed, so it is always worth its few bytes.
            if tier_rate and segment.num_tokens:
                elapsed_load += segment.num_bytes / tier_rate
            remaining -= segment.num_tokens
            total = elapsed_load + remaining / rate
            if total <= best_time:
                best_count, best_time = count, total
        return best_count

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return {"prefill_tokens_per_s": self._prefill_tokens_per_s, "load_bytes_per_s": dict(self._load_bytes_per_s)}
