"""GrowingLayer must hold exactly what transformers' DynamicLayer holds, without re-copying history."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from kvcellar.kv.growing_layer import GrowingLayer


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
