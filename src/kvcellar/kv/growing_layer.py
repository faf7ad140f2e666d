"""A full-attention cache layer that appends in place.

transformers' `DynamicLayer` concatenates its K/V with every chunk: each
append copies the whole history and briefly holds it twice, so a long
chunked prefill does O(n^2) copying and peaks at twice the request's KV.
`GrowingLayer` reserves the request's capacity once (prompt + max_tokens,
known before prefill) and writes each chunk into place; K/V are views of
that buffer. If a request outgrows it (it should not), the buffer doubles.

With a `KvBufferPool` (buffer_pool.py) the buffers may be a finished
request's, at least `capacity` tokens long and holding its stale K/V: only
[:length], written by this layer, is ever read. `resume(n)` instead adopts
the layer's own pooled buffers with their first n tokens in place: the pool
vouches for them (buffer_pool.py, "Resident prefix").
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from kvcellar.kv.buffer_pool import KvBufferPool, PoolMisuseError


class GrowingLayer(DynamicLayer):
    def __init__(self, capacity: int, buffers: KvBufferPool | None = None, index: int = 0) -> None:
        super().__init__()
        self.capacity = max(capacity, 1)
        self.length = 0
        self._buffers = buffers
        self.index = index  # the layer's place in its cache: which pooled buffers are its own
        # Set while a decode step is captured into a CUDA graph (engine/graph_decode.py): the step's position
        # as a device tensor, and how many keys its attention reads (the rest of them masked).
        self.graph_position: torch.Tensor | None = None
        self.graph_keys = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads, _, _ = key_states.shape
        # [B, H_kv, >= capacity, D]; only [:, :, :length] is meaningful.
        self._key_buffer = self._new_buffer(0, key_states, (batch, heads, self.capacity, key_states.shape[-1]))
        self._value_buffer = self._new_buffer(1, value_states, (batch, heads, self.capacity, value_states.shape[-1]))
        self.keys, self.values = self._key_buffer[:, :, :0], self._value_buffer[:, :, :0]
        self.is_initialized = True

    def _new_buffer(self, which: int, like: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
        """A buffer for the keys (`which` 0) or the values (1), from the pool when there is one."""
        if self._buffers is None:
            return like.new_empty(shape)
        return self._buffers.take((self.index, which), shape, like.dtype, like.device)

    def resume(self, num_tokens: int) -> None:
        """Stand at `num_tokens`, adopting this layer's pooled buffers, whose first `num_tokens` K/V are resident."""
        if self._buffers is None or self.is_initialized:
            raise PoolMisuseError("resume needs a fresh layer that draws from a buffer pool")
        self._key_buffer = self._buffers.take_resident((self.index, 0))
        self._value_buffer = self._buffers.take_resident((self.index, 1))
        self.dtype, self.device = self._key_buffer.dtype, self._key_buffer.device
        self.length = num_tokens
        self.keys, self.values = self._key_buffer[:, :, :num_tokens], self._value_buffer[:, :, :num_tokens]
        self.is_initialized = True

    def detach_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Hand the K/V buffers over (to a pool) and forget them: the layer is empty and uninitialized after."""
        buffers = (self._key_buffer, self._value_buffer)
        self._key_buffer = self._value_buffer = self.keys = self.values = None
        self.length, self.is_initialized = 0, False
        return buffers

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if self.graph_position is not None:  # written at a device-side position; `advance` moves the host's count
            self._key_buffer.index_copy_(2, self.graph_position, key_states)
            self._value_buffer.index_copy_(2, self.graph_position, value_states)
            return self._key_buffer[:, :, : self.graph_keys], self._value_buffer[:, :, : self.graph_keys]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self._make_room(end)
        self._key_buffer[:, :, self.length : end] = key_states
        self._value_buffer[:, :, self.length : end] = value_states
        self.advance(key_states.shape[-2])
        return self.keys, self.values

    def next_slot(self) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """The K and V buffers and the position the next token's K/V go to (room made for it), for a writer
        that then calls `advance(1)`; None before the first write."""
        if not self.is_initialized or self.graph_position is not None:
            return None
        self._make_room(self.length + 1)
        return self._key_buffer, self._value_buffer, self.length

    def advance(self, num_tokens: int) -> None:
        """Count `num_tokens` more tokens as written in place (by `update`, or by a replayed decode graph)."""
        self.length += num_tokens
        self.keys, self.values = self._key_buffer[:, :, : self.length], self._value_buffer[:, :, : self.length]

    def buffer_tokens(self) -> int:
        """How many tokens the K/V buffers hold room for (0 before the first write)."""
        if not self.is_initialized:
            return 0
        return min(self._key_buffer.shape[-2], self._value_buffer.shape[-2])

    def buffer_pointers(self) -> tuple[int, int]:
        """The K and V buffers' addresses: a captured CUDA graph reads and writes exactly these."""
        return self._key_buffer.data_ptr(), self._value_buffer.data_ptr()

    def _make_room(self, end: int) -> None:
        """Buffers that hold `end` tokens: doubled (at least to `end`) where either one is shorter."""
        if end > self.buffer_tokens():
            self._grow(max(end, 2 * self._key_buffer.shape[-2]))

    def _grow(self, capacity: int) -> None:
        for name in ("_key_buffer", "_value_buffer"):
            old = getattr(self, name)
            new = old.new_empty((*old.shape[:2], capacity, old.shape[-1]))
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("kvcellar never crops a live cache; restore a shorter prefix instead")


def new_cache(config: object, capacity: int, pool: KvBufferPool | None) -> DynamicCache:
    """A DynamicCache for `config` whose plain full-attention layers append in place, `capacity` tokens reserved.

    The layers take their buffers from `pool` (CPU: the runner's), or allocate their own (None).
    """
    cache = DynamicCache(config=config)
    for index, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:  # sliding / hybrid layers keep their own (bounded) storage
            cache.layers[index] = GrowingLayer(capacity, pool, index)
    return cache
