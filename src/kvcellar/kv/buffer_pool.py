"""Reuse of finished requests' per-layer K/V buffers (on CPU).

Why: a request's K/V buffers are large (8K tokens of the 0.6B shape: 28
layers x 2 x 16.8 MB). glibc serves allocations that size with mmap and
unmaps them on free, so the next request writes into fresh pages and pays a
page fault per 4 KiB: a restore into fresh memory takes a multiple of one into
reused memory, and so does a multi-turn TTFT (docs/benchmarks.md).
On CUDA torch's caching allocator already reuses freed blocks; the engine
uses a pool only on CPU.

Resident prefix: the buffers given back still hold the finished request's
K/V. `give_back(cache, resident_keys)` records the chained keys of the full
blocks they hold, in order; a next request whose restore begins with the same
keys (a chat's next turn, a repeated prompt) adopts its layers' own buffers
with those tokens in place (`GrowingLayer.resume`) and copies nothing for
them. An 8K-token restore of the 0.6B shape copies 0.9 GB, which was most of
the gap between a multi-turn hit and the new tokens' prefill.

Operations: `KvBufferPool.take(slot, shape, dtype, device)`, `.give_back(cache,
resident_keys)`, `.resident_blocks(keys, capacity)`, `.take_resident(slot)`
(`PoolMisuseError` when nothing is resident),
`.clear()`, `.num_bytes`. The pool is an explicit argument wherever a cache
is built (`growing_layer.new_cache`, `state.build_cache`, the adapter's
`restore`): the CPU runner passes its own, a GPU run passes None (plain
allocations). A slot is (layer index, 0 for keys / 1 for values): a layer
takes back its own buffers when they fit.

Invariants:
- Bounded: the pool holds at most the buffers of the one cache given back
  last (`give_back` drops whatever it held before), so at most one request's
  worth; a request that needs more capacity than the pooled buffers have
  drops them before allocating its own (the old and the new are never both
  kept).
- A buffer is owned by the pool or by exactly one live cache: `take` removes
  it from the pool, `give_back` detaches it from the cache's layers first.
- Reused buffers hold stale K/V. A `GrowingLayer` only reads [:length], all
  of which it wrote itself in the current request, or adopted as resident.
- Resident keys describe the pooled buffers only while all of them sit in the
  pool untouched: any `take` forgets them (the buffers are about to be
  overwritten), and so do `give_back` of another cache and `clear`. The keys
  are the caller's promise that the K/V at those positions equal what
  restoring those blocks would write (in exact mode: bit for bit, since a
  key names the tokens and the schedule that computed them).
- One buffer per layer, never slices of one shared storage: a single storage
  for every layer made the following forward slower (git history, KvArena).
- Only the engine's worker thread uses a pool (no lock).
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Sequence

import torch

# New allocations reserve capacity rounded up (`rounded_capacity`) to a multiple of ROUND_TOKENS, or of an
# eighth of the capacity's power of two above 8K, so a follow-up turn that adds a few tokens (P + 64
# after P) still fits the buffers of P. On CPU the pages of the extra room are never written unless a
# request reaches them, so they are not resident (each buffer is its own anonymous mapping,
# `_fresh_pages`): it costs address space, not RSS. On CUDA the same steps are the key counts of the
# decode graphs (engine/graph_decode.py): a buffer rounded this way holds every step's bucket.
ROUND_TOKENS = 1024


def rounded_capacity(tokens: int) -> int:
    """`tokens` rounded up to the step of its size (see ROUND_TOKENS): less than a quarter more above 8K tokens."""
    step = max(ROUND_TOKENS, 1 << max((max(tokens, 1) - 1).bit_length() - 3, 0))
    return -(-max(tokens, 1) // step) * step


class PoolMisuseError(Exception):
    """A caller asked the pool for buffers it does not hold: a bug, never a sign of a bad cached payload.

    Not a RuntimeError on purpose: restore treats KeyError / ValueError / RuntimeError from building a
    cache as a payload that does not fit and discards the entry, which here would drop a valid one.
    """


class KvBufferPool:
    def __init__(self) -> None:
        # (layer index, 0 keys / 1 values) -> [B, H_kv, capacity, D] buffer of the last cache given back
        self._free: dict[tuple[int, int], torch.Tensor] = {}
        self._resident: tuple[bytes, ...] = ()  # keys of the full blocks those buffers hold, oldest first
        self.num_reused = 0  # buffers handed out again (tests and benches read these counters)
        self.num_allocated = 0

    @property
    def num_bytes(self) -> int:
        return sum(buffer.numel() * buffer.element_size() for buffer in self._free.values())

    def take(self, slot: tuple[int, int], shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A [B, H_kv, >= capacity, D] buffer for `shape` = (B, H_kv, capacity, D); its contents are stale."""
        self._resident = ()
        capacity = shape[2]
        own = self._free.get(slot)
        if own is None or not _fits(own, shape, dtype, device):  # another layout: any pooled buffer that fits
            slot = next((s for s, buffer in self._free.items() if _fits(buffer, shape, dtype, device)), None)
        if slot is not None:
            self.num_reused += 1
            return self._free.pop(slot)
        # Pooled buffers too small for this request never fit its other layers either: free them first.
        self._free = {s: b for s, b in self._free.items() if b.shape[2] >= capacity}
        self.num_allocated += 1
        rounded = rounded_capacity(capacity)
        batch, heads, _, head_dim = shape
        if device.type != "cpu":  # zeros: a decode graph reads past the length (masked), and never-written
            # memory may hold NaN bit patterns, which a mask does not cancel (NaN * 0 is NaN)
            return torch.zeros((batch, heads, rounded, head_dim), dtype=dtype, device=device)
        return _fresh_pages((batch, heads, rounded, head_dim), dtype)

    def resident_blocks(self, keys: Sequence[bytes], capacity: int) -> int:
        """How many leading `keys` the pooled buffers hold in place; 0 unless they fit `capacity` tokens."""
        # Empty: a request that adopted them has not given them back (it may have ended without `give_back`).
        if not self._resident or not self._free or any(not _fits_here(b, capacity) for b in self._free.values()):
            return 0
        count = 0
        for held, wanted in zip(self._resident, keys):
            if held != wanted:
                break
            count += 1
        return count

    def take_resident(self, slot: tuple[int, int]) -> torch.Tensor:
        """The slot's own buffer with its resident K/V (call after `resident_blocks` said they are there)."""
        if not self._resident or slot not in self._free:
            raise PoolMisuseError(f"no resident buffer for layer {slot[0]}: the pool was taken from or emptied")
        self.num_reused += 1
        return self._free.pop(slot)

    def give_back(self, cache: object, resident_keys: Sequence[bytes] = ()) -> None:
        """Keep the K/V buffers of `cache`'s growing layers for the next request; `cache` is unusable after.

        `resident_keys`: the keys of the full blocks at the start of `cache`, whose K/V equal their cache
        entries' (see the module doc). Call only when nothing else can still read the cache's K/V (the
        request ended normally).
        """
        kept: dict[tuple[int, int], torch.Tensor] = {}
        complete = True  # every growing layer hands its buffers over: only then can they be resumed
        for index, layer in enumerate(cache.layers):  # GrowingLayers (growing_layer.py) detach; other kinds keep theirs
            if hasattr(layer, "detach_buffers"):
                if layer.is_initialized:
                    kept[(index, 0)], kept[(index, 1)] = layer.detach_buffers()
                else:
                    complete = False
        self._free = kept  # drops what the pool held before: one request's worth at most
        self._resident = tuple(resident_keys) if kept and complete else ()

    def clear(self) -> None:
        self._free, self._resident = {}, ()


def _fresh_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CPU tensor in a private anonymous mapping of its own (unmapped when freed).

    Not torch.empty: glibc serves a buffer below its mmap threshold (which it raises up to 32 MiB after
    a larger block is freed) from its heap, in pages a request's temporaries made resident, so the
    capacity no request writes was resident anyway (with long prefill chunks, most of the buffers'
    rounding; with one-block chunks, whose buffers glibc mmapped, none). Where there is no MAP_PRIVATE
    (Windows), torch.empty.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    private = getattr(mmap, "MAP_PRIVATE", None)
    if nbytes == 0 or private is None:
        return torch.empty(shape, dtype=dtype)
    pages = mmap.mmap(-1, nbytes, flags=private)  # private: not shared-memory backed
    return torch.frombuffer(pages, dtype=dtype).view(shape)  # the tensor keeps `pages` (the mapping) alive


def _fits_here(buffer: torch.Tensor, capacity: int) -> bool:
    """Long enough for `capacity` tokens and writable in the current mode."""
    # An inference tensor (made under torch.inference_mode, as the runner's are) cannot be written outside it.
    return buffer.shape[2] >= capacity and buffer.is_inference() == torch.is_inference_mode_enabled()


def _fits(buffer: torch.Tensor, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device) -> bool:
    batch, heads, capacity, head_dim = shape
    return (
        _fits_here(buffer, capacity)
        and buffer.dtype == dtype
        and buffer.device == device
        and (buffer.shape[0], buffer.shape[1], buffer.shape[3]) == (batch, heads, head_dim)
    )

