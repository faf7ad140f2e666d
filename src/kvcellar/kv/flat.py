"""Payload tensors packed into one flat allocation.

A captured entry holds two tensors per layer (keys and values) plus any
recurrent states: dozens of small tensors. Allocated one by one they fragment
the heap (on CPU, glibc then trims and re-faults the pages every request,
which slowed a prefill with capture on), and moved one by one they pay a copy
call each (on CUDA many small pinned host→device copies run well below the
bandwidth of one large copy).
So every payload built here lives in one uint8 buffer, `flat`, and its tensors
are views at 64-byte aligned offsets; moving the payload is one copy of `flat`.

Invariant: `payload.tensors[name]` is a view of `payload.flat` whenever
`payload.flat` is set; nothing writes through those views after packing.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

ALIGN = 64  # bytes; a multiple of every element size, and of a cache line


def _aligned(offset: int) -> int:
    return (offset + ALIGN - 1) // ALIGN * ALIGN


def _view(flat: torch.Tensor, offset: int, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    num_bytes = shape.numel() * dtype.itemsize
    return flat[offset : offset + num_bytes].view(dtype).view(shape)


def layout(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, int], int]:
    """Byte offset of each tensor in a flat buffer, and the buffer's size."""
    offsets, end = {}, 0
    for name, tensor in tensors.items():
        offsets[name] = end
        end = _aligned(end + tensor.numel() * tensor.element_size())
    return offsets, end


def pack(
    tensors: Mapping[str, torch.Tensor], device: torch.device | None = None, pin_memory: bool = False
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Copy `tensors` (any strides, any devices) into one new buffer on `device`; returns (views, buffer)."""
    offsets, size = layout(tensors)
    if device is None:
        device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
    flat = torch.empty(size, dtype=torch.uint8, device=device, pin_memory=pin_memory)
    views = {}
    for name, tensor in tensors.items():
        views[name] = _view(flat, offsets[name], tensor.dtype, tensor.shape)
        views[name].copy_(tensor)
    return views, flat


def byte_offset(flat: torch.Tensor, view: torch.Tensor) -> int:
    return view.storage_offset() * view.element_size() - flat.storage_offset()


def move(
    tensors: Mapping[str, torch.Tensor],
    flat: torch.Tensor,
    device: torch.device,
    pin_memory: bool = False,
    out: torch.Tensor | None = None,
    non_blocking: bool = False,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The same views over a copy of `flat` on `device`: one copy however many tensors there are.

    `out`: the buffer to copy into (uint8, `flat`'s size, on `device`), instead of a new one;
    `non_blocking`: the copy into `out` may still run when this returns (the caller syncs).
    """
    if out is not None:
        if out.shape != flat.shape or out.dtype != torch.uint8 or out.device.type != device.type:
            raise ValueError(f"out must be a uint8 buffer of {flat.numel()} bytes on {device}")
        moved = out.copy_(flat, non_blocking=non_blocking)
    elif pin_memory:  # a DMA from a GPU, synchronous with the current stream
        moved = torch.empty(flat.shape, dtype=torch.uint8, pin_memory=True).copy_(flat)
    else:
        moved = flat.to(device)
    return {name: _view(moved, byte_offset(flat, t), t.dtype, t.shape) for name, t in tensors.items()}, moved
