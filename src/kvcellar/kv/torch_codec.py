"""The codec of the engine's payloads: `StatePayload` (a flat dict of tensors) <-> entry-file tensors.

Operations: `TorchCodec(layout, device)` with `describe`, `tensor_bytes`,
`decode` (see codec.py), and `layout_string(model_layout)`.

Loading is zero-copy on CPU: each tensor is a view into the file's private
mapping (torch.frombuffer), which lives as long as the payload; on a GPU the
views are copied to the device once, here, so promoted entries are device
resident. Tensor shapes are [1, H_kv, T, D] for K/V, the layer's own shapes
for recurrent states, [vocab] float32 for logits (kv/state.py).
"""

from __future__ import annotations

import warnings

from collections.abc import Sequence

import torch

from kvcellar.kv.layout import LAYOUT_VERSION, ModelLayout
from kvcellar.kv.state import StatePayload
from kvcellar.tiers.format import EntryHeader, TensorSpec

_TO_NAME = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip
_FROM_NAME = {name: dtype for dtype, name in _TO_NAME.items()}


def layout_string(layout: ModelLayout) -> str:
    """A stable description of the layer layout, written into every file and checked on read."""
    kinds = ";".join(f"{int(s.has_kv)},{s.sliding_window or 0},{s.num_recurrent_states}" for s in layout.layers)
    return f"v{LAYOUT_VERSION}:{kinds}"


def _on_host(payload: StatePayload) -> dict[str, torch.Tensor]:
    """The payload's tensors in host memory.

    From CUDA: one DMA copy into pinned memory (torch's caching host allocator reuses those buffers), on a
    side stream. A copy into pageable memory goes through the driver's staging buffers with the CPU
    copying, and on the default stream it would queue between the next request's kernels: either way it
    slows a concurrent prefill.
    """
    payload.wait_ready()
    device = payload.device
    if device is None or device.type == "cpu":
        return payload.tensors
    if device.type != "cuda":
        return payload.to(torch.device("cpu")).tensors
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))  # the capture that filled the payload has run
    with torch.cuda.stream(side):
        moved = payload.to(torch.device("cpu"), pin_memory=True)  # waits for the side stream only
    return moved.tensors


class TorchCodec:
    def __init__(self, layout: str, device: torch.device | str = "cpu") -> None:
        self.layout = layout
        self._device = torch.device(device)

    def describe(self, payload: object) -> list[TensorSpec]:
        if not isinstance(payload, StatePayload):
            raise ValueError(f"TorchCodec stores StatePayload objects, got {type(payload).__name__}")
        specs = []
        for name, tensor in payload.tensors.items():
            if tensor.dtype not in _TO_NAME:
                raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, which the disk format does not store")
            specs.append(TensorSpec(name, _TO_NAME[tensor.dtype], tuple(tensor.shape)))
        return specs

    def tensor_bytes(self, payload: object, specs: Sequence[TensorSpec]) -> list[memoryview]:
        # Runs on the writer thread: a GPU payload comes to host memory in one copy (packed, kv/flat.py);
        # CPU tensors are viewed as they are.
        tensors = _on_host(payload)
        views = []
        for spec in specs:
            tensor = tensors[spec.name].detach().contiguous().reshape(-1)
            views.append(memoryview(tensor.view(torch.uint8).numpy()))
        return views

    def decode(self, header: EntryHeader, buffers: Sequence[memoryview]) -> object:
        tensors: dict[str, torch.Tensor] = {}
        for spec, buffer in zip(header.tensors, buffers):
            dtype = _FROM_NAME[spec.dtype]
            if buffer.nbytes == 0:
                tensor = torch.empty(spec.shape, dtype=dtype)
            elif buffer.readonly:  # bytes fetched from the remote tier: viewed, not copied (payloads are never written)
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="The given buffer is not writable")
                    tensor = torch.frombuffer(buffer, dtype=dtype).reshape(spec.shape)
            else:
                tensor = torch.frombuffer(buffer, dtype=dtype).reshape(spec.shape)
            tensors[spec.name] = tensor
        payload = StatePayload(tensors, len(header.token_ids))
        # On CPU the tensors stay views of the mapped file (no copy); elsewhere one packed buffer on the device.
        return payload if self._device.type == "cpu" else payload.to(self._device)
