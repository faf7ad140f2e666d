"""Reuse of finished requests' per-layer K/V buffers (on CPU).

Why: a request's K/V buffers are large (8K tokens of the 0.6B shape: 28
layers x 2 x 16.8 MB). glibc serves allocations that size with mmap and
unmaps them on free, so the next request writes into fresh pages and pays a
page fault per 4 KiB: an 8K restore took 0.25 s into fresh memory against
0.10 s into reused memory, and a multi-turn TTFT up to 2.1 s against 0.54 s.
On CUDA torch's caching allocator already reuses freed blocks; the engine
uses a pool only on CPU.

Operations: `KvBufferPool.take(shape, dtype, device)`, `.give_back(cache)`,
`.clear()`, `.num_bytes`; `lending(pool)`, the scope in which new caches
(`growing_layer.new_cache`) take their buffers from `pool`, and
`lending_pool()`, the pool of the current scope.

Invariants:
- Bounded: the pool holds at most the buffers of the one cache given back
  last (`give_back` drops whatever it held before), so at most one request's
  worth; a request that needs more capacity than the pooled buffers have
  drops them before allocating its own (the old and the new are never both
  kept).
- A buffer is owned by the pool or by exactly one live cache: `take` removes
  it from the pool, `give_back` detaches it from the cache's layers first.
- Reused buffers hold stale K/V. A `GrowingLayer` only reads [:length], all
  of which it wrote itself in the current request.
- One buffer per layer, never slices of one shared storage: a single storage
  for every layer made the following forward slower (git history, KvArena).
- Only the engine's worker thread uses a pool (no lock).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch

# New allocations reserve capacity rounded up to this many tokens, so a follow-up turn that adds a
# few tokens (P + 64 after P) still fits the buffers of P. The pages of the extra room are never
# written unless a request reaches them, so they are not resident: it costs address space, not RSS.
ROUND_TOKENS = 1024


class KvBufferPool:
    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []  # [B, H_kv, capacity, D] buffers of the last cache given back
        self.num_reused = 0  # buffers handed out again (tests and benches read these counters)
        self.num_allocated = 0

    @property
    def num_bytes(self) -> int:
        return sum(buffer.numel() * buffer.element_size() for buffer in self._free)

    def take(self, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A [B, H_kv, >= capacity, D] buffer for `shape` = (B, H_kv, capacity, D); its contents are stale."""
        batch, heads, capacity, head_dim = shape
        for index, buffer in enumerate(self._free):
            if _fits(buffer, shape, dtype, device):
                self.num_reused += 1
                return self._free.pop(index)
        # Pooled buffers too small for this request never fit its other layers either: free them first.
        self._free = [b for b in self._free if b.shape[2] >= capacity]
        self.num_allocated += 1
        rounded = -(-capacity // ROUND_TOKENS) * ROUND_TOKENS
        return torch.empty((batch, heads, rounded, head_dim), dtype=dtype, device=device)

    def give_back(self, cache: object) -> None:
        """Keep the K/V buffers of `cache`'s growing layers for the next request; `cache` is unusable after.

        Call only when nothing else can still read the cache's K/V (the request ended normally).
        """
        kept = []
        for layer in cache.layers:  # GrowingLayers (growing_layer.py) have detach_buffers; other kinds keep theirs
            if hasattr(layer, "detach_buffers") and layer.is_initialized:
                kept.extend(layer.detach_buffers())
        self._free = kept  # drops what the pool held before: one request's worth at most

    def clear(self) -> None:
        self._free = []


def _fits(buffer: torch.Tensor, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device) -> bool:
    batch, heads, capacity, head_dim = shape
    # An inference tensor (made under torch.inference_mode, as the runner's are) cannot be written outside it.
    return (
        buffer.is_inference() == torch.is_inference_mode_enabled()
        and buffer.dtype == dtype
        and buffer.device == device
        and (buffer.shape[0], buffer.shape[1], buffer.shape[3]) == (batch, heads, head_dim)
        and buffer.shape[2] >= capacity
    )


# The pool new caches draw from, per thread / context: set only inside `lending`.
_lending: ContextVar[KvBufferPool | None] = ContextVar("kvcellar_kv_buffer_pool", default=None)


@contextlib.contextmanager
def lending(pool: KvBufferPool | None) -> Iterator[None]:
    """Caches created inside this scope take their K/V buffers from `pool` (None: plain allocations)."""
    token = _lending.set(pool)
    try:
        yield
    finally:
        _lending.reset(token)


def lending_pool() -> KvBufferPool | None:
    return _lending.get()
