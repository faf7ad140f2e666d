"""Payload moves between media for the memory tiers: `host` RAM beside a GPU, and back to the `device`.

Operations: `payload_mover(device) -> callable` (the `adopt` hook of a
`MemoryTier`: it runs when an entry is stored in that tier).

On CUDA, host copies go to pinned memory (page-locked, so the copy back to
the GPU runs at full bus speed). A payload already on the target device is
returned as it is: no copy. A payload moves as one packed buffer (kv/flat.py):
one copy, not one per tensor. These copies run on the request thread at
eviction / promotion time; they are memory-speed copies, not disk writes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvcellar.kv.state import StatePayload


def payload_mover(device: torch.device | str) -> Callable[[object], object]:
    """A function that returns the payload with every tensor on `device` (pinned when it is host RAM beside CUDA)."""
    target = torch.device(device)
    if target.type == "cuda" and target.index is None:  # tensors report cuda:N, never bare cuda
        target = torch.device("cuda", torch.cuda.current_device())
    pin = target.type == "cpu" and torch.cuda.is_available()

    def adopt(payload: object) -> object:
        if not isinstance(payload, StatePayload):
            return payload
        if payload.is_on(target):
            return payload
        return payload.to(target, pin_memory=pin)  # one copy of the packed buffer

    return adopt
