"""Engine payloads on disk: standard safetensors files, exact tensors back, aligned in-place views."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from kvcellar.cache import CacheEntry, Priority, hash_tail
from kvcellar.kv.state import StatePayload
from kvcellar.tiers.disk.tier import DiskTier
from kvcellar.tiers.format import ITEM_SIZES, parse_header
from kvcellar.kv.torch_codec import TorchCodec

from tests.tiers.helpers import ROOT_A, entry_files

LAYOUT = "v1:1,0,0;1,0,0;0,0,1"


def _payload() -> StatePayload:
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "0.keys": torch.randn(1, 2, 3, 8, generator=generator).to(torch.bfloat16),  # odd byte count: 96 bytes
        "0.values": torch.randn(1, 2, 3, 8, generator=generator).to(torch.bfloat16),
        "2.conv.0": torch.randn(1, 5, 4, generator=generator).to(torch.bfloat16),
        "2.recurrent.0": torch.randn(1, 2, 4, 4, generator=generator),  # float32, as transformers keeps it
        "logits": torch.randn(33, generator=generator),
    }
    return StatePayload(tensors, 3)


def _entry(payload: StatePayload) -> CacheEntry:
    tokens = (5, 6, 7)
    return CacheEntry(hash_tail(ROOT_A, tokens), ROOT_A, tokens, payload.num_bytes, Priority.SYSTEM, payload,
                      is_tail=True, has_logits=True, namespace=ROOT_A)  # fmt: skip


def test_payload_round_trips_bit_for_bit_through_a_restart(tmp_path):
    payload = _payload()
    tier = DiskTier(tmp_path / "kv", 1 << 20, TorchCodec(LAYOUT))
    entry = _entry(payload)
    assert tier.prepare_store(entry).accepted
    tier.complete_store(entry.key)
    tier.close()
    tier = DiskTier(tmp_path / "kv", 1 << 20, TorchCodec(LAYOUT))
    (loaded,) = tier.prepare_load([entry.key])
    assert isinstance(loaded.payload, StatePayload) and loaded.payload.num_tokens == 3
    assert loaded.payload.tensors.keys() == payload.tensors.keys()
    for name, tensor in payload.tensors.items():
        got = loaded.payload.tensors[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape and torch.equal(got, tensor)
    assert loaded.num_bytes == payload.num_bytes and loaded.priority == Priority.SYSTEM
    tier.close()


def test_files_are_standard_safetensors_with_aligned_tensors(tmp_path):
    payload = _payload()
    tier = DiskTier(tmp_path / "kv", 1 << 20, TorchCodec(LAYOUT))
    entry = _entry(payload)
    tier.prepare_store(entry)
    tier.complete_store(entry.key)
    tier.close()
    (path,) = entry_files(tmp_path / "kv")
    loaded = load_file(str(path))  # the reference reader agrees with ours
    assert all(torch.equal(loaded[name], tensor) for name, tensor in payload.tensors.items())
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["key"] == entry.key.hex() and metadata["namespace"] == ROOT_A.hex()
    assert metadata["token_ids"] == "5,6,7" and metadata["has_logits"] == "1" and metadata["layout"] == LAYOUT
    assert metadata["checksum"].split(":")[0] in ("xxh3_128", "sha256")
    header, data_start = parse_header(path.read_bytes())
    assert data_start % 8 == 0
    document = json.loads(path.read_bytes()[8:data_start])
    for spec in header.tensors:
        begin = document[spec.name]["data_offsets"][0]
        assert begin % ITEM_SIZES[spec.dtype] == 0, f"{spec.name} is not aligned for in-place views"


def test_wrong_layout_is_never_served(tmp_path):
    tier = DiskTier(tmp_path / "kv", 1 << 20, TorchCodec(LAYOUT))
    entry = _entry(_payload())
    tier.prepare_store(entry)
    tier.complete_store(entry.key)
    tier.close()
    other = DiskTier(tmp_path / "kv", 1 << 20, TorchCodec("v1:1,0,0"))  # another model's layer layout
    try:
        other.prepare_load([entry.key])
        raise AssertionError("a file of another layout was served")
    except KeyError:
        pass
    assert other.stats().counters["num_corrupt"] == 1
    other.close()
