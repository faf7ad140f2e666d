"""The KV events, encoded as vLLM's `KVEventBatch` (vllm/distributed/kv_events.py, vLLM 0.32).

Operations: `block_stored`, `block_removed`, `all_blocks_cleared` (one event
each, as plain msgpack-ready values) and `encode_batch`.

On the wire (msgpack), a batch is the array `[ts, [event, ...], data_parallel_rank]`
(msgspec `array_like`); each event is a map whose first key `type` names its
kind (msgspec's tag), fields with a default left out where they hold it:
- BlockStored: `block_hashes` (list), `parent_block_hash` (None for a
  chain's first block), `token_ids`, `block_size`, `lora_id` (None),
  `medium`, `lora_name` (None);
- BlockRemoved: `block_hashes`, `medium`;
- AllBlocksCleared: no field.
Hashes are kvcellar's 32-byte block keys (cache/hashing.py) as msgpack bin,
the form of vLLM's default `bytes` hashes.
Mediums: "GPU" (the device tier on a GPU), "CPU" (the device tier on a
CPU, the host tier), "STORAGE" (the disk tier).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import msgpack

Hash = bytes


def block_stored(keys: Sequence[Hash], parent: Hash | None, token_ids: Sequence[int], block_size: int,
                 medium: str) -> dict:  # fmt: skip
    return {"type": "BlockStored", "block_hashes": list(keys), "parent_block_hash": parent,
            "token_ids": list(token_ids), "block_size": block_size, "lora_id": None, "medium": medium,
            "lora_name": None}  # fmt: skip


def block_removed(keys: Sequence[Hash], medium: str) -> dict:
    return {"type": "BlockRemoved", "block_hashes": list(keys), "medium": medium}


def all_blocks_cleared() -> dict:
    return {"type": "AllBlocksCleared"}


def encode_batch(events: Sequence[dict], data_parallel_rank: int = 0, ts: float | None = None) -> bytes:
    return msgpack.packb([time.time() if ts is None else ts, list(events), data_parallel_rank], use_bin_type=True)
