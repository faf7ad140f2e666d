"""How much K/V running requests may hold (`kv_budget_tokens`), and the decode passes' batch sizes
(`DecodeBatchStats`, read by the server's metrics).

The budget is counted in tokens: a token's K/V takes the same bytes in every
request (`kv_bytes_per_token`: every layer's keys and values, an upper bound
for models whose sliding-window or recurrent layers hold less).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from kvcellar.config import RUNNING_KV_MEMORY_FRACTION, size_text
from kvcellar.engine.loader import LoadedModel
from kvcellar.engine.prepacked import machine_memory

log = logging.getLogger(__name__)

# Upper bounds of the decode batch-size histogram's buckets (Prometheus `le`); larger batches fall in +Inf.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def kv_bytes_per_token(loaded: LoadedModel) -> int:
    """Every layer's keys and values of one token, in the model's dtype."""
    config = loaded.model.config.get_text_config(decoder=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_hidden_layers * 2 * kv_heads * head_dim * loaded.dtype.itemsize


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return machine_memory() // 2 or 8 << 30  # no /proc/meminfo: half the machine, else a guess


def kv_budget_tokens(loaded: LoadedModel, budget_bytes: int | None) -> int:
    """`budget_bytes` (None: RUNNING_KV_MEMORY_FRACTION of the memory free now) in tokens of this model's K/V."""
    if budget_bytes is None:
        budget_bytes = int(RUNNING_KV_MEMORY_FRACTION * _available_bytes(loaded.device))
    per_token = kv_bytes_per_token(loaded)
    tokens = max(budget_bytes // per_token, 1)
    log.info("running requests' K/V budget: %s (%d tokens)", size_text(budget_bytes), tokens)
    return tokens


class DecodeBatchStats:
    """A histogram of decode passes' batch sizes (how many requests each fed), safe to read from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets = [0] * len(BATCH_SIZE_BUCKETS)
        self._count = 0
        self._sum = 0

    def observe(self, size: int) -> None:
        with self._lock:
            for index, bound in enumerate(BATCH_SIZE_BUCKETS):
                if size <= bound:
                    self._buckets[index] += 1
                    break
            self._count += 1
            self._sum += size

    def snapshot(self) -> tuple[list[tuple[float, int]], int, int]:
        """(cumulative (upper bound, count) pairs, +Inf included; count; sum), as Prometheus histograms report."""
        with self._lock:
            cumulative, running = [], 0
            for bound, count in zip(BATCH_SIZE_BUCKETS, self._buckets):
                running += count
                cumulative.append((float(bound), running))
            cumulative.append((float("inf"), self._count))
            return cumulative, self._count, self._sum
