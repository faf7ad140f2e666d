"""A full-attention cache layer that appends in place.

transformers' `DynamicLayer` concatenates its K/V with every chunk: each
append copies the whole history and briefly holds it twice, so a long
chunked prefill does O(n^2) copying and peaks at twice the request's KV.
`GrowingLayer` reserves the request's capacity once (prompt + max_tokens,
known before prefill) and writes each chunk into place; K/V are views of
that buffer. If a request outgrows it (it should not), the buffer doubles.

`KvArena` lends those buffers out of one allocation that the next request
reuses. A fresh buffer is fresh memory: writing 940 MB of restored K/V into
one (an 8K-token prompt, 0.6B shape) page-faults it in as it goes. Invariant:
one request's cache draws on an arena at a time (the engine's worker runs
requests one after another); `begin` marks a new request's cache, after
which buffers lent before are dead.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class KvArena:
    """Storage for the K/V buffers of one request at a time, kept for the next one."""

    ALIGN = 64

    def __init__(self) -> None:
        self._storage: torch.Tensor | None = None
        self._cursor = 0
        self._num_takes = 0

    @property
    def num_bytes(self) -> int:
        return 0 if self._storage is None else self._storage.numel()

    def begin(self, num_takes: int) -> None:
        """A new request's cache will take `num_takes` buffers, all sized like the first."""
        self._cursor, self._num_takes = 0, num_takes

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        size = torch.Size(shape).numel() * dtype.itemsize
        step = -(-size // self.ALIGN) * self.ALIGN
        if self._cursor == 0:
            needed = step * self._num_takes
            held = self._storage
            # Reuse what is held unless it is elsewhere, too small, or over twice what this request needs.
            if held is None or held.device != device or not needed <= held.numel() <= 2 * needed:
                self._storage = None  # let the old storage go first: the peak holds one, not two
                self._storage = torch.empty(needed, dtype=torch.uint8, device=device)
        storage = self._storage
        if storage is None or storage.device != device or self._cursor + step > storage.numel():
            return torch.empty(shape, dtype=dtype, device=device)  # a layer unlike the first: its own buffer
        view = storage[self._cursor : self._cursor + size]
        self._cursor += step
        return view.view(dtype).view(shape)


class GrowingLayer(DynamicLayer):
    def __init__(self, capacity: int, arena: KvArena | None = None) -> None:
        super().__init__()
        self.capacity = max(capacity, 1)
        self.length = 0
        self._arena = arena

    def _new_buffer(self, like: torch.Tensor) -> torch.Tensor:
        shape = (like.shape[0], like.shape[1], self.capacity, like.shape[-1])  # [B, H_kv, capacity, D]
        if self._arena is None:
            return like.new_empty(shape)
        return self._arena.take(shape, like.dtype, like.device)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        # Only [:, :, :length] is meaningful.
        self._key_buffer = self._new_buffer(key_states)
        self._value_buffer = self._new_buffer(value_states)
        self.keys, self.values = self._key_buffer[:, :, :0], self._value_buffer[:, :, :0]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self._key_buffer.shape[-2]:
            self._grow(max(end, 2 * self._key_buffer.shape[-2]))
        self._key_buffer[:, :, self.length : end] = key_states
        self._value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self._key_buffer[:, :, :end], self._value_buffer[:, :, :end]
        return self.keys, self.values

    def _grow(self, capacity: int) -> None:
        for name in ("_key_buffer", "_value_buffer"):
            old = getattr(self, name)
            new = old.new_empty((*old.shape[:2], capacity, old.shape[-1]))
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("kvcellar never crops a live cache; restore a shorter prefix instead")


def new_cache(config: object, capacity: int, arena: KvArena | None = None) -> DynamicCache:
    """A DynamicCache for `config` whose plain full-attention layers append in place, `capacity` tokens reserved.

    With an `arena`, their buffers come from it, and any cache drawn from it before is dead from now on.
    """
    cache = DynamicCache(config=config)
    num_growing = 0
    for index, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:  # sliding / hybrid layers keep their own (bounded) storage
            cache.layers[index] = GrowingLayer(capacity, arena)
            num_growing += 1
    if arena is not None:
        arena.begin(2 * num_growing)  # keys and values
    return cache
