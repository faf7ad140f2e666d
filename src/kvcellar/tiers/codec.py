"""Payload codecs: how a tier turns an opaque payload into named tensors of bytes, and back.

Operations: `PayloadCodec` (the protocol: `layout`, `describe`, `tensor_bytes`,
`decode`) and `RawCodec`, whose payloads are plain `dict[str, bytes]` (used
by tests and tools that must not import torch). `TorchCodec`
(torch_codec.py) handles the engine's `StatePayload`.

Threads: `describe` runs on the request thread when a store is reserved (so
it must not copy data: it reads shapes and dtypes only); `tensor_bytes` runs
on the disk writer thread; `decode` runs on the loading thread and may keep
views into the buffer it is given (the buffer then lives as long as the payload).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from kvcellar.tiers.format import EntryHeader, TensorSpec


class PayloadCodec(Protocol):
    layout: str  # the layer layout payloads follow; written to every file and checked on read

    def describe(self, payload: object) -> list[TensorSpec]:
        """Names, dtypes and shapes of the payload's tensors (no data copied); ValueError if not a payload."""
        ...

    def tensor_bytes(self, payload: object, specs: Sequence[TensorSpec]) -> list[memoryview]:
        """The bytes of each tensor of `specs`, in that order (C-contiguous, little-endian)."""
        ...

    def decode(self, header: EntryHeader, buffers: Sequence[memoryview]) -> object:
        """The payload whose tensors are `buffers` (one per `header.tensors`, in order)."""
        ...


class RawCodec:
    """Payloads that are `dict[str, bytes]`: each value is stored as a U8 tensor of its length."""

    def __init__(self, layout: str = "raw") -> None:
        self.layout = layout

    def describe(self, payload: object) -> list[TensorSpec]:
        if not isinstance(payload, dict) or not all(isinstance(v, (bytes, bytearray)) for v in payload.values()):
            raise ValueError(f"RawCodec stores dict[str, bytes] payloads, got {type(payload).__name__}")
        return [TensorSpec(name, "U8", (len(value),)) for name, value in payload.items()]

    def tensor_bytes(self, payload: object, specs: Sequence[TensorSpec]) -> list[memoryview]:
        return [memoryview(payload[spec.name]) for spec in specs]

    def decode(self, header: EntryHeader, buffers: Sequence[memoryview]) -> object:
        return {spec.name: bytes(buffer) for spec, buffer in zip(header.tensors, buffers)}
