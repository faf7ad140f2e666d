"""KvBufferPool: buffers of a finished cache are reused when they fit, never shared, never more than one cache's worth;
the K/V they hold are adopted in place only for the resident keys, and only while every buffer is still pooled."""

from __future__ import annotations

import mmap

import pytest
import torch
from transformers import DynamicCache, LlamaConfig

from kvcellar.kv.buffer_pool import ROUND_TOKENS, KvBufferPool, PoolMisuseError
from kvcellar.kv.growing_layer import GrowingLayer, new_cache

CPU = torch.device("cpu")


def _cache(pool: KvBufferPool, capacity: int, num_layers: int = 3, heads: int = 2, dim: int = 8,
           dtype: torch.dtype = torch.float32, tokens: int = 5, fill: float = 1.0) -> DynamicCache:
    """A cache of GrowingLayers drawing from `pool`, `tokens` tokens of K/V = `fill` written into each layer."""
    cache = DynamicCache()
    cache.layers = [GrowingLayer(capacity, pool, index) for index in range(num_layers)]
    for layer in cache.layers:
        layer.update(torch.full((1, heads, tokens, dim), fill, dtype=dtype), torch.full((1, heads, tokens, dim), -fill, dtype=dtype))
    return cache


def _pointers(cache: DynamicCache) -> set[int]:
    return {ptr for layer in cache.layers for ptr in (layer._key_buffer.data_ptr(), layer._value_buffer.data_ptr())}


def test_buffers_given_back_are_reused_and_rounded_up():
    pool = KvBufferPool()
    first = _cache(pool, capacity=100)
    assert first.layers[0]._key_buffer.shape == (1, 2, ROUND_TOKENS, 8)  # 100 rounded up: room for a longer turn
    pointers = _pointers(first)
    pool.give_back(first)
    assert pool.num_bytes == 3 * 2 * ROUND_TOKENS * 2 * 8 * 4
    second = _cache(pool, capacity=ROUND_TOKENS)  # larger than 100, still fits the rounded buffers
    assert _pointers(second) == pointers
    assert (pool.num_allocated, pool.num_reused, pool.num_bytes) == (6, 6, 0)  # taken out: never in two places


def test_given_back_cache_is_detached():
    pool = KvBufferPool()
    cache = _cache(pool, capacity=16)
    pool.give_back(cache)
    assert all(not layer.is_initialized and layer.keys is None and layer._key_buffer is None for layer in cache.layers)
    assert cache.get_seq_length() == 0


def test_stale_contents_never_show():
    pool = KvBufferPool()
    pool.give_back(_cache(pool, capacity=64, tokens=40, fill=float("nan")))
    reused = _cache(pool, capacity=64, tokens=3, fill=2.0)
    assert pool.num_reused == 6
    for layer in reused.layers:
        assert layer.keys.shape[-2] == 3 and torch.equal(layer.keys, torch.full((1, 2, 3, 8), 2.0))
        assert torch.equal(layer.values, torch.full((1, 2, 3, 8), -2.0))
    assert torch.isnan(reused.layers[0]._key_buffer[:, :, 3:40]).all()  # the stale rows are there, only never read


def test_too_small_buffers_are_dropped_before_allocating():
    pool = KvBufferPool()
    pool.give_back(_cache(pool, capacity=ROUND_TOKENS))
    big = _cache(pool, capacity=ROUND_TOKENS + 1)
    assert pool.num_reused == 0 and pool.num_bytes == 0  # the small ones were freed, not kept beside the new
    assert big.layers[0]._key_buffer.shape[-2] == 2 * ROUND_TOKENS


@pytest.mark.parametrize("change", [{"dtype": torch.bfloat16}, {"heads": 4}, {"dim": 16}])
def test_other_shape_or_dtype_gets_a_fresh_buffer(change):
    pool = KvBufferPool()
    given = _cache(pool, capacity=32)
    pointers = _pointers(given)
    pool.give_back(given)
    other = _cache(pool, capacity=32, **change)
    assert pool.num_reused == 0 and not _pointers(other) & pointers
    dtype = change.get("dtype", torch.float32)
    assert all(layer.keys.dtype == dtype for layer in other.layers)


def test_inference_buffers_are_not_lent_outside_inference_mode():
    pool = KvBufferPool()
    with torch.inference_mode():
        pool.give_back(_cache(pool, capacity=32))
    outside = _cache(pool, capacity=32)  # writing an inference tensor here would raise
    assert pool.num_reused == 0 and not outside.layers[0]._key_buffer.is_inference()


def test_pool_holds_one_cache_at_most():
    pool = KvBufferPool()
    a, b = _cache(pool, capacity=32), _cache(pool, capacity=32)
    b_pointers = _pointers(b)
    pool.give_back(a)
    pool.give_back(b)  # a's buffers are dropped, not added to
    assert pool.num_bytes == 3 * 2 * ROUND_TOKENS * 2 * 8 * 4
    assert {buffer.data_ptr() for buffer in pool._free.values()} == b_pointers


def test_new_cache_takes_its_buffers_from_the_pool_it_is_given_and_only_then():
    config = LlamaConfig(num_hidden_layers=3, hidden_size=16, num_attention_heads=2, num_key_value_heads=2,
                         intermediate_size=32, vocab_size=32)  # fmt: skip
    pool = KvBufferPool()
    given = _cache(pool, capacity=32, dim=8)
    pointers = _pointers(given)
    pool.give_back(given)
    plain = _write(new_cache(config, 32, None))
    assert not _pointers(plain) & pointers and pool.num_bytes > 0  # None: fresh buffers, the pool untouched
    pooled = _write(new_cache(config, 32, pool))
    assert _pointers(pooled) == pointers and pool.num_bytes == 0


def _write(cache: DynamicCache) -> DynamicCache:
    for layer in cache.layers:
        layer.update(torch.ones(1, 2, 5, 8), torch.ones(1, 2, 5, 8))
    return cache


def test_each_layer_takes_back_its_own_buffers():
    pool = KvBufferPool()
    first = _cache(pool, capacity=32)
    own = [(layer._key_buffer.data_ptr(), layer._value_buffer.data_ptr()) for layer in first.layers]
    pool.give_back(first)
    second = _cache(pool, capacity=32)
    assert [(layer._key_buffer.data_ptr(), layer._value_buffer.data_ptr()) for layer in second.layers] == own


def test_resident_blocks_counts_the_common_leading_keys():
    pool = KvBufferPool()
    pool.give_back(_cache(pool, capacity=32, tokens=12), resident_keys=[b"a", b"b", b"c"])
    assert pool.resident_blocks([b"a", b"b", b"c", b"d"], capacity=32) == 3
    assert pool.resident_blocks([b"a", b"b"], capacity=32) == 2
    assert pool.resident_blocks([b"a", b"x", b"c"], capacity=32) == 1  # chained keys: nothing after a difference
    assert pool.resident_blocks([b"x", b"b"], capacity=32) == 0
    assert pool.resident_blocks([b"a"], capacity=ROUND_TOKENS + 1) == 0  # the buffers would have to grow: copy instead


def test_resume_adopts_the_resident_tokens_in_place():
    pool = KvBufferPool()
    given = _cache(pool, capacity=32, tokens=12, fill=3.0)
    pointers = _pointers(given)
    pool.give_back(given, resident_keys=[b"a", b"b", b"c"])
    cache = DynamicCache()
    cache.layers = [GrowingLayer(32, pool, index) for index in range(3)]
    for layer in cache.layers:
        layer.resume(8)
    assert _pointers(cache) == pointers
    for layer in cache.layers:
        assert layer.keys.shape[-2] == 8 and torch.equal(layer.keys, torch.full((1, 2, 8, 8), 3.0))
        layer.update(torch.full((1, 2, 1, 8), 5.0), torch.full((1, 2, 1, 8), -5.0))  # appends after the adopted tokens
        assert layer.keys.shape[-2] == 9 and layer.keys[0, 0, 8, 0] == 5.0 and layer.values[0, 0, 7, 0] == -3.0


def test_taking_any_buffer_forgets_the_resident_keys():
    pool = KvBufferPool()
    pool.give_back(_cache(pool, capacity=32), resident_keys=[b"a"])
    pool.take((0, 0), (1, 2, 32, 8), torch.float32, CPU)  # about to be overwritten by another request
    assert pool.resident_blocks([b"a"], capacity=32) == 0
    with pytest.raises(PoolMisuseError, match="no resident buffer"):
        pool.take_resident((1, 0))


@pytest.mark.parametrize("reset", ["clear", "give_back"])
def test_clear_and_give_back_replace_the_resident_keys(reset):
    pool = KvBufferPool()
    pool.give_back(_cache(pool, capacity=32), resident_keys=[b"a"])
    if reset == "clear":
        pool.clear()
    else:
        pool.give_back(_cache(KvBufferPool(), capacity=32))  # another cache, no keys
    assert pool.resident_blocks([b"a"], capacity=32) == 0


def test_no_resident_keys_unless_every_layer_handed_its_buffers_over():
    pool = KvBufferPool()
    cache = _cache(pool, capacity=32)
    cache.layers.append(GrowingLayer(32, pool, 3))  # never written: nothing of it to resume
    pool.give_back(cache, resident_keys=[b"a"])
    assert pool.resident_blocks([b"a"], capacity=32) == 0 and pool.num_bytes > 0


def test_new_cpu_buffers_are_writable_mappings_of_the_rounded_size():
    if not hasattr(mmap, "MAP_PRIVATE"):
        pytest.skip("no private anonymous mappings here")
    pool = KvBufferPool()
    buffer = pool.take((0, 0), (1, 2, 10, 8), torch.float32, CPU)
    assert buffer.shape == (1, 2, ROUND_TOKENS, 8) and buffer.is_contiguous()
    buffer[:, :, :10] = 7.0  # writable (a frombuffer tensor over a read-only mapping would not be)
    assert torch.equal(buffer[:, :, :10], torch.full((1, 2, 10, 8), 7.0))
    assert buffer.untyped_storage().nbytes() == 2 * ROUND_TOKENS * 8 * 4
