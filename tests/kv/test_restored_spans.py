"""A restore says where its K/V were copied from (`restored_spans`): exactly the bytes of the payloads it read
in place, and never keeps an entry alive by saying so."""

from __future__ import annotations

import gc

import torch
from transformers import AutoConfig

from kvcellar.kv import StatePayload, build_cache, inspect_layout, restored_spans

CPU = torch.device("cpu")


def _payloads(config, sizes: list[int], seed: int = 0) -> list[StatePayload]:
    generator = torch.Generator().manual_seed(seed)
    shape = (1, config.num_key_value_heads, 0, config.head_dim)
    payloads = []
    for size in sizes:
        tensors = {}
        for layer in range(config.num_hidden_layers):
            for name in ("keys", "values"):
                tensors[f"{layer}.{name}"] = torch.randn(*shape[:2], size, shape[3], generator=generator).bfloat16()
        payloads.append(StatePayload(tensors, size))
    return payloads


def test_spans_name_the_bytes_the_restored_cache_holds(tiny_model_dirs):
    config = AutoConfig.from_pretrained(tiny_model_dirs["qwen3"])
    payloads = _payloads(config, [32, 32, 32])
    cache = build_cache(config, inspect_layout(config), payloads, 80, CPU, 100, None)  # the last one used in part
    spans = restored_spans(payloads, 80, CPU)
    assert [(span.start, span.length) for span in spans] == [(0, 32), (32, 32), (64, 16)]
    for span in spans:
        for index, layer in enumerate(cache.layers):
            for name, held in (("keys", layer.keys), ("values", layer.values)):
                source = span.payload().tensors[f"{index}.{name}"][:, :, : span.length]
                assert torch.equal(held[:, :, span.start : span.start + span.length], source)


def test_resident_tokens_and_payloads_held_elsewhere_are_no_span(tiny_model_dirs):
    config = AutoConfig.from_pretrained(tiny_model_dirs["qwen3"])
    payloads = _payloads(config, [32, 32, 32])
    elsewhere = StatePayload({name: tensor.to("meta") for name, tensor in payloads[2].tensors.items()}, 32)
    spans = restored_spans([*payloads[:2], elsewhere], 96, CPU, resident_tokens=32)
    assert [(span.start, span.payload()) for span in spans] == [(32, payloads[1])]


def test_a_span_lets_its_entry_go(tiny_model_dirs):
    config = AutoConfig.from_pretrained(tiny_model_dirs["qwen3"])
    payloads = _payloads(config, [32])
    spans = restored_spans(payloads, 32, CPU)
    assert spans[0].payload() is payloads[0]
    del payloads
    gc.collect()
    assert spans[0].payload() is None  # evicted: the decode reads the request's own copy
