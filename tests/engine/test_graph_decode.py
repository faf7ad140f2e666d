"""CUDA decode graphs (engine/graph_decode.py): the same tokens as eager steps, exact mode bit-identical with a
restored prefix, graphs made again when the K/V buffers change, eager steps where graphs do not apply.

The graph tests need a GPU (CI has none: they run on the device machine, docs/benchmarks.md); the layer's
graph mode and the bucket rounding they rely on are checked on any machine.
"""

from __future__ import annotations

import pytest
import torch

from kvcellar.kv.buffer_pool import KvBufferPool, rounded_capacity
from kvcellar.kv.growing_layer import GrowingLayer

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def test_buffers_are_rounded_to_the_decode_buckets() -> None:
    assert [rounded_capacity(n) for n in (1, 1024, 1025, 8192, 8193, 16385, 32768)] == [
        1024, 1024, 2048, 8192, 10240, 20480, 32768]  # fmt: skip
    for tokens in range(1, 70000, 997):  # a buffer for `tokens` holds the bucket of every step up to it
        assert all(rounded_capacity(step) <= rounded_capacity(tokens) for step in (1, tokens // 2, tokens))
        assert tokens <= rounded_capacity(tokens) < tokens * 1.25 + 1024
    pool = KvBufferPool()
    assert pool.take((0, 0), (1, 2, 9000, 8), torch.float32, torch.device("cpu")).shape[2] == 10240


def test_a_layer_in_graph_mode_writes_at_the_device_position_and_returns_the_bucket() -> None:
    layer = GrowingLayer(capacity=16)
    layer.update(torch.ones(1, 2, 5, 4), torch.ones(1, 2, 5, 4))
    layer.graph_position, layer.graph_keys = torch.tensor([5]), 8
    keys, values = layer.update(torch.full((1, 2, 1, 4), 7.0), torch.full((1, 2, 1, 4), 9.0))
    assert keys.shape == values.shape == (1, 2, 8, 4) and layer.length == 5  # the host count moves on `advance`
    assert keys[0, 0, 5].tolist() == [7.0] * 4 and values[0, 1, 5].tolist() == [9.0] * 4
    layer.graph_position = None
    layer.advance(1)
    assert layer.length == 6 and layer.keys.shape[2] == 6 and layer.keys[0, 0, 5, 0] == 7.0
    assert layer.buffer_tokens() >= 16 and len(set(layer.buffer_pointers())) == 2


def _engine(model_dir, exact: bool | None = None, enabled: bool = True):
    from kvcellar import CacheConfig, Engine

    return Engine.load(str(model_dir), device="cuda", block_size=256, cache=CacheConfig(enabled=enabled, exact=exact))


@needs_cuda
def test_graph_steps_give_the_eager_steps_tokens(tiny_fp32_dirs) -> None:
    engine = _engine(tiny_fp32_dirs["qwen3"], enabled=False)
    try:
        runner = engine._worker.runner
        prompt = list(range(10, 60))
        with_graphs = engine.generate(prompt_ids=prompt, max_tokens=24, ignore_eos=True)
        assert runner.graphs.num_captured >= 1 and not runner.graphs.failed
        graphs, runner.graphs = runner.graphs, None
        eager = engine.generate(prompt_ids=prompt, max_tokens=24, ignore_eos=True)
        runner.graphs = graphs
        assert with_graphs.token_ids == eager.token_ids
        longer = engine.generate(prompt_ids=list(range(10, 1900)), max_tokens=8, ignore_eos=True)  # new buffers
        assert len(longer.token_ids) == 8 and runner.graphs.num_captured >= 2
    finally:
        engine.close()


@needs_cuda
def test_exact_mode_with_graphs_is_bit_identical_with_a_restored_prefix(tiny_model_dirs) -> None:
    engine = _engine(tiny_model_dirs["qwen3"], exact=True)
    reference = _engine(tiny_model_dirs["qwen3"], exact=True, enabled=False)
    try:
        prompt = [(7 * i) % 900 + 5 for i in range(700)]
        cold = reference.generate(prompt_ids=prompt, max_tokens=32, ignore_eos=True)
        engine.generate(prompt_ids=prompt[:600], max_tokens=1, ignore_eos=True)
        warm = engine.generate(prompt_ids=prompt, max_tokens=32, ignore_eos=True)
        assert warm.num_cached_tokens > 0 and warm.token_ids == cold.token_ids
        assert engine._worker.runner.graphs.num_captured >= 1
    finally:
        engine.close()
        reference.close()


@needs_cuda
def test_sliding_window_models_decode_eagerly(tiny_model_dirs) -> None:
    engine = _engine(tiny_model_dirs["gemma3"], enabled=False)
    try:
        result = engine.generate(prompt_ids=list(range(10, 60)), max_tokens=6, ignore_eos=True)
        assert len(result.token_ids) == 6 and engine._worker.runner.graphs.num_captured == 0
    finally:
        engine.close()
