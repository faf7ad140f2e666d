"""Payload moves between media for the memory tiers: `host` RAM beside a GPU, and back to the `device`.

Operations: `payload_mover(device, reserve=None) -> callable` (the `adopt`
hook of a `MemoryTier`: it runs when an entry is stored in that tier), and
`pinned_admission(reserve, block_size)` (its `admit` hook).

On CUDA, host copies go to pinned memory (page-locked, so the copy back to
the GPU runs at full bus speed). A payload already on the target device is
returned as it is: no copy. A payload moves as one packed buffer (kv/flat.py):
one copy, not one per tensor. These copies run on the request thread at
eviction / promotion time; they are memory-speed copies, not disk writes.
Their pinned buffers come from a `PinnedReserve` (pinned.py) when one is
given: allocating pinned memory on the request thread is what is slow.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvcellar.kv import flat as flat_buffers
from kvcellar.kv.state import StatePayload
from kvcellar.tiers.pinned import PinnedReserve


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

    Measured on an H100: copying a 32K-token request's blocks (3.8 GB) synchronously added ~0.15 s to
    its prefill. The returned payload carries the copy's event (readers wait for it, StatePayload.wait_ready);
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
