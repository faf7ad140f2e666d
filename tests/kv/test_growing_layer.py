"""GrowingLayer must hold exactly what transformers' DynamicLayer holds, without re-copying history."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from kvcellar.kv.growing_layer import GrowingLayer, KvArena


def test_appends_match_dynamic_layer_and_grow_past_capacity():
    reference, growing = DynamicLayer(), GrowingLayer(capacity=10)
    generator = torch.Generator().manual_seed(0)
    for chunk in (4, 4, 1, 7):  # 16 tokens: the buffer must double past its reserved 10
        keys = torch.randn(1, 2, chunk, 8, generator=generator)
        values = torch.randn(1, 2, chunk, 8, generator=generator)
        expected = reference.update(keys, values)
        got = growing.update(keys, values)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert growing.get_seq_length() == 16
    assert growing._key_buffer.shape[-2] == 20


def test_history_is_written_in_place():
    layer = GrowingLayer(capacity=32)
    layer.update(torch.ones(1, 1, 8, 4), torch.ones(1, 1, 8, 4))
    buffer = layer._key_buffer
    layer.update(torch.zeros(1, 1, 8, 4), torch.zeros(1, 1, 8, 4))
    assert layer._key_buffer is buffer  # no reallocation within capacity
    assert layer.keys.data_ptr() == buffer.data_ptr()


def _layers_from(arena: KvArena, capacity: int, count: int = 2) -> list[GrowingLayer]:
    arena.begin(2 * count)
    layers = [GrowingLayer(capacity, arena) for _ in range(count)]
    for index, layer in enumerate(layers):
        layer.update(torch.full((1, 2, 3, 4), float(index)), torch.full((1, 2, 3, 4), -float(index)))
    return layers


def test_an_arena_lends_one_storage_and_the_next_request_reuses_it():
    arena = KvArena()
    first = _layers_from(arena, capacity=8)
    storage = arena._storage
    assert arena.num_bytes == 4 * 1 * 2 * 8 * 4 * 4  # 2 layers x K,V of [1, 2, 8, 4] float32, 64-byte aligned
    assert [layer.keys[0, 0, 0, 0].item() for layer in first] == [0.0, 1.0]
    assert [layer.values[0, 0, 0, 0].item() for layer in first] == [-0.0, -1.0]  # K and V never overlap
    _layers_from(arena, capacity=6)  # needs 3/4 of it: reused, no new memory
    assert arena._storage is storage
    _layers_from(arena, capacity=20)  # more than held: replaced
    assert arena._storage is not storage and arena.num_bytes == 4 * 1 * 2 * 20 * 4 * 4
    _layers_from(arena, capacity=4)  # under half of what is held: given back, a smaller one taken
    assert arena.num_bytes == 4 * 1 * 2 * 4 * 4 * 4


def test_a_layer_unlike_the_first_gets_its_own_buffer():
    arena = KvArena()
    arena.begin(4)
    small, large = GrowingLayer(4, arena), GrowingLayer(16, arena)
    small.update(torch.ones(1, 1, 2, 4), torch.ones(1, 1, 2, 4))
    large.update(torch.zeros(1, 1, 16, 4), torch.zeros(1, 1, 16, 4))
    assert small.keys.sum().item() == 8.0 and large.keys.sum().item() == 0.0
    assert large._key_buffer.untyped_storage().data_ptr() != arena._storage.untyped_storage().data_ptr()
