"""Capture the state of a token range from a live cache; rebuild a cache from captured ranges.

Payload layout (LAYOUT_VERSION 1), one flat dict of tensors per entry so every
tier can store it as it is (the disk tier writes it as one safetensors file):
- `"{layer}.keys"`, `"{layer}.values"`: [1, H_kv, T, D] K/V of the entry's T
  tokens (full attention), or of its last min(T, window - 1) tokens (sliding
  window: older tokens are never attended to again).
- `"{layer}.conv.{i}"`, `"{layer}.recurrent.{i}"`: the recurrent state i of a
  linear-attention / SSM layer at the entry's END position; valid only there.
- `"logits"`: [vocab] float32 next-token logits at the end (optional).

Ownership: captured tensors are fresh copies, never views of the live cache,
because transformers mutates recurrent states in place and would otherwise
rewrite a stored checkpoint. They are packed into one allocation (`flat.py`).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from kvcellar.kv import flat as flat_buffers
from kvcellar.kv.buffer_pool import KvBufferPool
from kvcellar.kv.growing_layer import GrowingLayer, new_cache
from kvcellar.kv.layout import ModelLayout


@dataclass(eq=False)
class StatePayload:
    tensors: dict[str, torch.Tensor]
    num_tokens: int
    flat: torch.Tensor | None = None  # the one buffer all `tensors` view, when packed (flat.py)
    # A CUDA event the contents wait for: the tensors are being filled by an asynchronous copy (a
    # demotion to pinned host memory). Whoever reads them calls `wait_ready()` first.
    ready: object | None = None

    def wait_ready(self) -> None:
        """Block until the copy that fills the tensors has finished (at once when there is none)."""
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None

    @property
    def num_bytes(self) -> int:
        """Bytes held: the packed buffer (alignment padding included), else the tensors' own bytes."""
        if self.flat is not None:
            return self.flat.numel()
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def device(self) -> torch.device | None:
        return self.flat.device if self.flat is not None else next((t.device for t in self.tensors.values()), None)

    def is_on(self, device: torch.device) -> bool:
        """Whether the tensors already live on `device` (a device without an index matches any index)."""
        here = self.device
        return here is None or (here.type == device.type and (device.index is None or here.index == device.index))

    def to(self, device: torch.device, pin_memory: bool = False) -> StatePayload:
        """A packed copy on `device` (pinned host memory if asked): one copy when already packed."""
        self.wait_ready()
        if self.flat is not None:
            tensors, flat = flat_buffers.move(self.tensors, self.flat, device, pin_memory)
        else:
            tensors, flat = flat_buffers.pack(self.tensors, device, pin_memory)
        return StatePayload(tensors, self.num_tokens, flat)

    @property
    def logits(self) -> torch.Tensor | None:
        return self.tensors.get("logits")


def capture_entry(
    cache: DynamicCache, layout: ModelLayout, start: int, end: int, logits: torch.Tensor | None = None
) -> StatePayload:
    """Copy the state of tokens [start, end) out of `cache`, which must stand exactly at position `end`."""
    num_tokens = end - start
    tensors: dict[str, torch.Tensor] = {}
    for index, (spec, layer) in enumerate(zip(layout.layers, cache.layers)):
        if spec.has_kv and num_tokens > 0:
            if spec.sliding_window is None:
                keys, values = layer.keys[:, :, start:end], layer.values[:, :, start:end]
            else:
                kept = min(num_tokens, spec.sliding_window - 1)
                keys, values = layer.keys[:, :, -kept:], layer.values[:, :, -kept:]
            tensors[f"{index}.keys"], tensors[f"{index}.values"] = keys, values
        # Recurrent state exists only at `end`; a 0-token entry reuses its parent block's checkpoint.
        if num_tokens > 0:
            for state in range(spec.num_recurrent_states):
                tensors[f"{index}.conv.{state}"] = layer.conv_states[state]
                tensors[f"{index}.recurrent.{state}"] = layer.recurrent_states[state]
    if logits is not None:
        tensors["logits"] = logits.float().reshape(-1)
    views, flat = flat_buffers.pack(tensors)  # the copy: the live cache is never referenced
    return StatePayload(views, num_tokens, flat)


def _kv_pieces(payloads: Sequence[StatePayload], name: str, lengths: Sequence[int], needed: int | None) -> list[torch.Tensor]:
    """Per-payload K or V slices, oldest first, each cut to its used length; stops once `needed` tokens are covered."""
    pieces: list[torch.Tensor] = []
    covered = 0
    for payload, used in zip(reversed(payloads), reversed(lengths)):
        if used == 0:
            continue
        tensor = payload.tensors[name]
        # A sliding payload holds the LAST tensor.shape[-2] tokens of its range; `used` cuts from its front.
        dropped = payload.num_tokens - used
        tensor = tensor[:, :, : max(tensor.shape[-2] - dropped, 0)]
        pieces.append(tensor)
        covered += tensor.shape[-2]
        if needed is not None and covered >= needed:
            break
    pieces.reverse()
    return pieces


def _fill_growing_layers(
    cache: DynamicCache, payloads: Sequence[StatePayload], lengths: Sequence[int], device: torch.device, resident: int
) -> None:
    """Append each payload's K/V to the full-attention layers, payload after payload, after `resident` tokens.

    Payload-major so that a payload held elsewhere (pinned host RAM, a mapped
    file) crosses to `device` as one copy of its packed buffer, not one per
    tensor (one large copy runs nearer the link's bandwidth than many small ones). The first
    `resident` tokens (whole payloads) are already in the layers' buffers.
    """
    growing = [index for index, layer in enumerate(cache.layers) if isinstance(layer, GrowingLayer)]
    if resident:
        for index in growing:
            cache.layers[index].resume(resident)
    for payload, used in zip(payloads, lengths):
        if resident >= used > 0:
            resident -= used
            continue
        if used == 0 or not growing:
            continue
        local = payload if payload.is_on(device) else payload.to(device)  # one copy of the packed buffer
        for index in growing:
            keys = local.tensors[f"{index}.keys"][:, :, :used]
            values = local.tensors[f"{index}.values"][:, :, :used]
            layer = cache.layers[index]
            if not layer.is_initialized:
                layer.lazy_initialization(keys, values)
            layer.update(keys, values)


def _used_lengths(payloads: Sequence[StatePayload], num_tokens: int) -> list[int]:
    """How many tokens of each payload a restore to `num_tokens` uses: all, the last one perhaps in part."""
    lengths = [payload.num_tokens for payload in payloads]
    excess = sum(lengths) - num_tokens
    if excess < 0 or (payloads and excess > lengths[-1]):
        raise ValueError(f"payloads cover {sum(lengths)} tokens, cannot restore position {num_tokens}")
    if excess:
        lengths[-1] -= excess
    return lengths


@dataclass(frozen=True)
class RestoredSpan:
    """Tokens [start, start + length) of a restored cache's full-attention layers, copied from the first
    `length` tokens of `payload`'s K/V: while the payload lives (a weak reference, so a restore never
    keeps an evicted entry in memory), each `"{layer}.keys"` / `"{layer}.values"` tensor of it holds
    the same bytes as the cache's keys and values of those tokens."""

    start: int
    length: int
    payload: weakref.ReferenceType


def restored_spans(payloads: Sequence[StatePayload], num_tokens: int, device: torch.device,
                   resident_tokens: int = 0) -> tuple[RestoredSpan, ...]:  # fmt: skip
    """Where `build_cache(... payloads, num_tokens, device, ..., resident_tokens)` copied its K/V from: the
    payloads it read in place on `device` (one moved there first, or adopted resident tokens, is no span)."""
    spans, position = [], 0
    for payload, used in zip(payloads, _used_lengths(payloads, num_tokens)):
        if position >= resident_tokens and used > 0 and payload.is_on(device):
            spans.append(RestoredSpan(position, used, weakref.ref(payload)))
        position += used
    return tuple(spans)


def build_cache(
    config: object,
    layout: ModelLayout,
    payloads: Sequence[StatePayload],
    num_tokens: int,
    device: torch.device,
    capacity: int,
    pool: KvBufferPool | None,
    resident_tokens: int = 0,
) -> DynamicCache:
    """A fresh DynamicCache standing at position `num_tokens`, from payloads covering [0, >= num_tokens).

    The last payload may be trimmed (used only in part); the cache core allows
    that only for layouts without recurrent layers, whose state cannot be cut.
    Copies each K/V byte once, straight into the layers' reserved buffers
    (`capacity` tokens: prompt + max_tokens), taken from `pool` (None: fresh allocations); nothing
    is deep-copied. `resident_tokens`: the K/V of the first payloads' tokens (whole payloads) already
    sit in `pool`'s buffers (`KvBufferPool.resident_blocks`); the full-attention layers adopt them.
    """
    lengths = _used_lengths(payloads, num_tokens)
    excess = sum(payload.num_tokens for payload in payloads) - num_tokens
    cache = new_cache(config, max(capacity, num_tokens), pool)
    if num_tokens == 0:
        return cache
    state_source = next(p for p, used in zip(reversed(payloads), reversed(lengths)) if used > 0)
    _fill_growing_layers(cache, payloads, lengths, device, resident_tokens)
    for index, (spec, layer) in enumerate(zip(layout.layers, cache.layers)):
        if spec.has_kv and not isinstance(layer, GrowingLayer):  # sliding / other K/V layers: the needed tail
            needed = None if spec.sliding_window is None else min(num_tokens, spec.sliding_window - 1)
            keys = torch.cat(_kv_pieces(payloads, f"{index}.keys", lengths, needed), dim=-2).to(device)
            values = torch.cat(_kv_pieces(payloads, f"{index}.values", lengths, needed), dim=-2).to(device)
            if needed is not None:
                keys, values = keys[:, :, -needed:], values[:, :, -needed:]
                layer.cumulative_length = num_tokens
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
        for state in range(spec.num_recurrent_states):
            if excess:
                raise ValueError("a recurrent state cannot be trimmed: restore only at an entry's end")
            conv = state_source.tensors[f"{index}.conv.{state}"].to(device)
            recurrent = state_source.tensors[f"{index}.recurrent.{state}"].to(device)
            layer.lazy_initialization(conv_states=conv, state_idx=state, conv_kernel_size=conv.shape[-1])
            layer.lazy_initialization(recurrent_states=recurrent, state_idx=state)
            layer.conv_states[state].copy_(conv)
            layer.recurrent_states[state].copy_(recurrent)
            layer.has_previous_state[state] = True
    return cache
