"""The host tier's tensor side: pinned host buffers allocated ahead on a background thread, and payload moves.

The host tier itself is a `MemoryTier` (tiers/memory.py) named "host"; this module supplies its
`adopt` hook (`payload_mover`: copy a payload to host RAM, pinned, or back to the device) and its
`admit` hook (`pinned_admission`: refuse a demotion that would page-lock memory during a request).

Operations: `PinnedReserve(budget_bytes).take(num_bytes, ahead) -> uint8 tensor`,
`.refusal(num_bytes, ahead)` (why taking one now would stall a request),
`.pause(active)` (a request runs: allocate nothing), `.copy_stream(device)`
(where demotions copy) and `.flush()` (wait for those copies), `.stats()`, `.close()`.

Why: page-locking fresh memory is slow (the driver faults in and pins every
page): while the host tier was still growing, demoting a long request's
blocks on the request thread took several times that request's cold prefill,
and a small fraction of it once the pinned buffers existed
(docs/benchmarks.md). So the first demotion of a whole block starts a thread that allocates
buffers of that size until the host tier's budget is covered, and demotions
take them (blocks of one model all have one size; tail entries, smaller
and rarer, allocate as before).
Buffers the host tier frees go back to torch's pinned allocator, which
reuses them: once the tier is full, allocations are fast anyway.

The thread allocates only while the model is idle (`pause`): page-locking
holds a CUDA driver lock, and allocating during a prefill stalls that
prefill's kernel launches until it is done. A request that
starts while one buffer is being allocated waits for that one only.

While a request runs and no buffer is ready, the host tier refuses the
demotion (`refusal`, a counted drop) rather than page-lock memory on the
request thread: the block is still on disk when the disk tier is on.

Invariant: the bytes allocated ahead never exceed the budget; nothing ever
waits for the thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from kvcellar.kv import flat as flat_buffers
from kvcellar.kv.state import StatePayload

SMALL_BYTES = 16 * 1024**2  # buffers up to this size are pinned on the request thread (milliseconds)


def _pinned_empty(num_bytes: int) -> torch.Tensor:
    return torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True)


class PinnedReserve:
    """Pinned buffers of one size (a block's payload), allocated ahead between requests, up to a budget."""

    def __init__(
        self, budget_bytes: int, allocate: Callable[[int], torch.Tensor] = _pinned_empty, small_bytes: int = SMALL_BYTES
    ) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0 (got {budget_bytes})")
        self._budget = budget_bytes
        self._allocate = allocate
        self._small_bytes = small_bytes  # pinned on the request thread even during a request
        self._size: int | None = None  # the buffer size allocated ahead: the first block's
        self._spare: list[torch.Tensor] = []
        self._allocated_ahead = 0  # bytes the thread has allocated (handed out or spare)
        self._cond = threading.Condition()
        self._closed = False
        self._paused = False
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._thread: threading.Thread | None = None
        self._counts = {"taken_spare": 0, "allocated_on_request": 0}

    def take(self, num_bytes: int, ahead: bool = True) -> torch.Tensor:
        """A pinned uint8 buffer of exactly `num_bytes` (contents undefined).

        `ahead`: this size is the one to allocate ahead (a whole block's payload).
        """
        with self._cond:
            self._learn(num_bytes, ahead)
            if num_bytes == self._size and self._spare:
                self._counts["taken_spare"] += 1
                return self._spare.pop()
            self._counts["allocated_on_request"] += 1
        return self._allocate(num_bytes)

    def refusal(self, num_bytes: int, ahead: bool = True) -> str | None:
        """None if a buffer of `num_bytes` can be had now without page-locking much memory during a request."""
        with self._cond:
            self._learn(num_bytes, ahead)
            if not self._paused or (num_bytes == self._size and self._spare) or self._filled:
                return None  # no request runs, or a buffer is ready, or torch's allocator recycles freed ones
            if num_bytes <= self._small_bytes:
                return None  # a prompt's logits, a short tail: quick to pin
            return "no pinned buffer is ready during a request (they are allocated between requests)"

    @property
    def _filled(self) -> bool:
        """Under the lock: the thread has allocated the whole budget (or never will)."""
        return self._size is not None and self._allocated_ahead + self._size > self._budget

    def _learn(self, num_bytes: int, ahead: bool) -> None:
        """Under the lock: the first block-sized request fixes the size and starts the thread."""
        if ahead and self._size is None and not self._closed and num_bytes <= self._budget:
            self._size = num_bytes
            self._thread = threading.Thread(target=self._fill, name="kvcellar-pinned-reserve", daemon=True)
            self._thread.start()

    def pause(self, active: bool) -> None:
        """While active (a request runs), the thread allocates nothing."""
        with self._cond:
            self._paused = active
            self._cond.notify_all()

    def copy_stream(self, device: torch.device) -> torch.cuda.Stream:
        """The side stream demotions copy on (one per device; `flush` waits for it)."""
        with self._cond:
            if device not in self._streams:
                self._streams[device] = torch.cuda.Stream(device)
            return self._streams[device]

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every demotion copy issued so far has landed in host memory."""
        with self._cond:
            streams = list(self._streams.values())
        for stream in streams:
            stream.synchronize()
        return True

    def stats(self) -> dict[str, int]:
        with self._cond:
            spare_bytes = len(self._spare) * (self._size or 0)
            return {**self._counts, "allocated_ahead_bytes": self._allocated_ahead, "spare_bytes": spare_bytes}

    def close(self) -> None:
        """Stop allocating and drop the spare buffers (those handed out live on with their payloads)."""
        with self._cond:
            self._closed = True
            self._spare.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _fill(self) -> None:
        size = self._size
        while True:
            with self._cond:
                while self._paused and not self._closed:
                    self._cond.wait()
                if self._closed or self._allocated_ahead + size > self._budget:
                    return
                self._allocated_ahead += size
            buffer = self._allocate(size)
            with self._cond:
                if self._closed:
                    return
                self._spare.append(buffer)

def payload_mover(
    device: torch.device | str, reserve: PinnedReserve | None = None, block_size: int = 0
) -> Callable[[object], object]:
    """A function that returns the payload with every tensor on `device` (pinned when it is host RAM beside CUDA).

    `reserve` supplies the pinned buffers; buffers of `block_size`-token payloads are allocated ahead.
    """
    target = torch.device(device)
    if target.type == "cuda" and target.index is None:  # tensors report cuda:N, never bare cuda
        target = torch.device("cuda", torch.cuda.current_device())
    pin = target.type == "cpu" and torch.cuda.is_available()

    def adopt(payload: object) -> object:
        if not isinstance(payload, StatePayload):
            return payload
        if payload.is_on(target):
            return payload
        if pin and reserve is not None and payload.flat is not None and payload.flat.is_cuda:
            buffer = reserve.take(payload.flat.numel(), ahead=payload.num_tokens == block_size)
            return _demote_async(payload, buffer, reserve.copy_stream(payload.flat.device))
        return payload.to(target, pin_memory=pin)  # one copy of the packed buffer

    return adopt


def _demote_async(payload: StatePayload, buffer: torch.Tensor, side: torch.cuda.Stream) -> StatePayload:
    """GPU -> pinned `buffer` on a side stream: the copy engine runs beside the prefill, not in its way.

    A synchronous copy of a long request's blocks would add its whole transfer time to that request's
    prefill. The returned payload carries the copy's event (readers wait for it, StatePayload.wait_ready);
    the GPU buffer is recorded on the side stream, so the allocator does not reuse it before the copy ran.
    """
    device = payload.flat.device
    side.wait_stream(torch.cuda.current_stream(device))  # the capture that filled the payload has run
    with torch.cuda.stream(side):
        tensors, flat = flat_buffers.move(payload.tensors, payload.flat, torch.device("cpu"), out=buffer, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(side)
    payload.flat.record_stream(side)
    return StatePayload(tensors, payload.num_tokens, flat, ready=ready)


def pinned_admission(reserve: PinnedReserve, block_size: int) -> Callable[[object], str | None]:
    """The host tier's `admit` hook: refuse a demotion that would page-lock memory during a request."""

    def admit(payload: object) -> str | None:
        if not isinstance(payload, StatePayload) or payload.flat is None:
            return None
        return reserve.refusal(payload.flat.numel(), ahead=payload.num_tokens == block_size)

    return admit
