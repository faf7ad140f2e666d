"""The CPU decode-attention kernel (engine/kernels): built from source, equal to SDPA, alike at every thread count,
used by decode steps, and a warning plus torch's path where it cannot be built."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from kvcellar.engine import attention, kernels


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory):
    """The kernels' op namespace, built once for the module (the build is cached per process after)."""
    return kernels._build(tmp_path_factory.mktemp("kernels"))


@pytest.fixture(scope="module")
def op(ops):
    return ops.one_row_attention


@pytest.fixture(scope="module")
def causal(ops):
    if not ops.has_bf16_dot():
        pytest.skip("this CPU has no AVX512-BF16: the causal kernel is not built for it (torch's flash runs)")
    return ops.causal_attention


def _reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """fp32 SDPA over grouped heads: query [B, H, D] (unscaled), key/value [B, H_kv, n, D] -> [B, H, D]."""
    expected = torch.nn.functional.scaled_dot_product_attention(
        query.unsqueeze(2).float(), key.float(), value.float(), enable_gqa=True)  # fmt: skip
    return expected.squeeze(2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(16, 8, 128), (8, 2, 64), (4, 4, 256), (6, 3, 96)])
def test_the_kernel_equals_sdpa_over_grouped_heads(op, dtype, heads: int, kv_heads: int, dim: int) -> None:
    """Head sizes 64/128/256 take the AVX-512 path where there is one, 96 the plain loops."""
    generator = torch.Generator().manual_seed(heads * dim)
    for num_keys in (1, 255, 256, 700):
        capacity = num_keys + 37  # a growing cache's buffers: rows beyond num_keys hold stale data
        key = torch.randn(2, kv_heads, capacity, dim, generator=generator).to(dtype)
        value = torch.randn(2, kv_heads, capacity + 5, dim, generator=generator).to(dtype)[:, :, :capacity]  # own stride
        query = torch.randn(2, heads, dim, generator=generator).to(dtype)  # a model's query has its K/V's dtype
        output = op(query, key, value, num_keys, dim**-0.5)
        expected = _reference(query, key[:, :, :num_keys], value[:, :, :num_keys])
        torch.testing.assert_close(output, expected, rtol=1e-5, atol=2e-6)


def test_the_kernel_computes_the_same_bits_at_any_thread_count(op) -> None:
    """Chunks and their merge depend on the key count alone: exact mode may resize the thread pool."""
    generator = torch.Generator().manual_seed(3)
    key, value = torch.randn(1, 8, 3000, 128, generator=generator).bfloat16(), torch.randn(1, 8, 3000, 128).bfloat16()
    query = torch.randn(1, 16, 128, generator=generator)
    threads = torch.get_num_threads()
    try:
        outputs = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            outputs.append(op(query, key, value, 2900, 0.125))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outputs[0], other) for other in outputs[1:])


def test_the_kernel_refuses_what_it_cannot_read(op) -> None:
    key = torch.randn(1, 2, 10, 8)
    with pytest.raises(RuntimeError, match="num_keys within the buffers"):
        op(torch.randn(1, 4, 8), key, key, 11, 1.0)
    with pytest.raises(RuntimeError, match="rows contiguous"):
        op(torch.randn(1, 4, 8), key.transpose(2, 3).contiguous().transpose(2, 3), key, 5, 1.0)


def _ragged_rows(generator: torch.Generator, lengths: list[int], kv_heads: int = 2, dim: int = 64):
    """Rows of a batched step: a bf16 query [B, H, D] and each row's own K/V buffers [1, H_kv, n + 9, D] (stale tail)."""
    keys = [torch.randn(1, kv_heads, n + 9, dim, generator=generator).bfloat16() for n in lengths]
    values = [torch.randn(1, kv_heads, n + 9, dim, generator=generator).bfloat16() for n in lengths]
    return torch.randn(len(lengths), 4 * kv_heads, dim, generator=generator).bfloat16(), keys, values


def test_the_ragged_kernel_reads_shared_chunks_and_computes_each_row_as_alone(ops) -> None:
    """A chunk read from a shared tensor (at an offset in it) gives the bits of the row's own copy."""
    chunk = ops.keys_per_chunk()
    lengths = [2 * chunk + 30, chunk, 3 * chunk + 1]
    query, keys, values = _ragged_rows(torch.Generator().manual_seed(11), lengths)
    alone = torch.cat([ops.one_row_attention(query[b : b + 1].contiguous(), keys[b], values[b], n, 0.125)
                       for b, n in enumerate(lengths)])  # fmt: skip
    # A shared entry holding rows 0 and 2's chunk 1 (the same bytes: row 2 copied from row 0) from key 7 on.
    keys[2][:, :, chunk : 2 * chunk] = keys[0][:, :, chunk : 2 * chunk]
    values[2][:, :, chunk : 2 * chunk] = values[0][:, :, chunk : 2 * chunk]
    alone[2] = ops.one_row_attention(query[2:3].contiguous(), keys[2], values[2], lengths[2], 0.125)[0]
    entry_keys = torch.cat([torch.zeros(1, 2, 7, 64).bfloat16(), keys[0][:, :, chunk : 2 * chunk]], dim=2)
    entry_values = torch.cat([torch.zeros(1, 2, 7, 64).bfloat16(), values[0][:, :, chunk : 2 * chunk]], dim=2)
    shared = ops.ragged_one_row_attention(query, keys, values, lengths, [entry_keys, entry_keys],
                                          [entry_values, entry_values], [0, 1, 7, 2, 1, 7], 0.125)  # fmt: skip
    assert torch.equal(shared, alone)
    # It is read there: other bytes in the entry change those rows' results, and only theirs.
    entry_values[:, :, 7:] += 1
    changed = ops.ragged_one_row_attention(query, keys, values, lengths, [entry_keys, entry_keys],
                                           [entry_values, entry_values], [0, 1, 7, 2, 1, 7], 0.125)  # fmt: skip
    assert [torch.equal(changed[b], alone[b]) for b in range(3)] == [False, True, False]


def test_the_ragged_kernel_refuses_shared_chunks_it_cannot_read(ops) -> None:
    chunk = ops.keys_per_chunk()
    query, keys, values = _ragged_rows(torch.Generator().manual_seed(12), [chunk + 5, 2 * chunk])
    entry = keys[1][:, :, :chunk]

    def call(shared_at: list[int], entry: torch.Tensor = entry) -> None:
        count = len(shared_at) // 3
        ops.ragged_one_row_attention(query, keys, values, [chunk + 5, 2 * chunk], [entry] * count, [entry] * count,
                                     shared_at, 0.125)  # fmt: skip

    with pytest.raises(RuntimeError, match="names a row and one of its chunks"):
        call([0, 2, 0])  # row 0 has chunks 0 and 1
    with pytest.raises(RuntimeError, match="one shared source per chunk"):
        call([1, 0, 0, 1, 0, 0])
    with pytest.raises(RuntimeError, match="num_keys within the buffers"):
        call([1, 1, 1])  # from key 1 on, the entry holds chunk - 1 keys
    with pytest.raises(RuntimeError, match="one value tensor and one"):
        ops.ragged_one_row_attention(query, keys, values, [chunk + 5, 2 * chunk], [entry], [entry], [1, 0], 0.125)


def test_append_rows_writes_each_rows_keys_and_values_at_its_position_and_nothing_else(ops) -> None:
    generator = torch.Generator().manual_seed(13)
    states = torch.randn(3, 2, 2, 16, generator=generator).bfloat16().transpose(1, 2)  # [B, H_kv, 2, D]: strided
    keys, values = states[:, :, :1], states[:, :, 1:]  # [3, 2, 1, 16] each, views of one tensor
    buffers = [torch.randn(1, 2, capacity, 16, generator=generator).bfloat16() for capacity in (5, 9, 1)]
    value_buffers = [buffer.clone() for buffer in buffers]
    expected_keys, expected_values = [b.clone() for b in buffers], [b.clone() for b in value_buffers]
    positions = [4, 0, 0]
    for row, position in enumerate(positions):
        expected_keys[row][:, :, position] = keys[row, :, 0]
        expected_values[row][:, :, position] = values[row, :, 0]
    ops.append_rows(keys, values, buffers, value_buffers, positions)
    assert all(torch.equal(got, want) for got, want in zip(buffers + value_buffers, expected_keys + expected_values))
    with pytest.raises(RuntimeError, match="a position within its buffer"):
        ops.append_rows(keys, values, buffers, value_buffers, [5, 0, 0])
    with pytest.raises(RuntimeError, match="buffers of the states' dtype"):
        ops.append_rows(keys, values, [b.float() for b in buffers], value_buffers, positions)


def test_decode_steps_run_the_kernel_and_torchs_path_agrees(op, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(attention, "_one_row_kernel", lambda *args: calls.append(args[3]) or op(*args))
    generator = torch.Generator().manual_seed(5)
    query = torch.randn(1, 8, 1, 64, generator=generator).bfloat16()
    key, value = torch.randn(1, 2, 400, 64, generator=generator).bfloat16(), torch.randn(1, 2, 400, 64).bfloat16()
    with_kernel = attention._decode_cpu(query, key[:, :, :300], value[:, :, :300], None)
    assert calls == [300] and with_kernel.dtype == torch.bfloat16 and with_kernel.shape == (1, 8, 1, 64)
    monkeypatch.setattr(attention, "_one_row_kernel", None)
    without = attention._decode_cpu(query, key[:, :, :300], value[:, :, :300], None)
    torch.testing.assert_close(with_kernel.float(), without.float(), rtol=0.02, atol=0.02)  # bf16 products in torch's


def test_a_failed_build_warns_once_and_leaves_torchs_paths(tmp_path: Path, monkeypatch, caplog) -> None:
    def broken(kernel_dir: Path):
        raise OSError("no C++ compiler found")

    monkeypatch.setattr(kernels, "_build", broken)
    monkeypatch.setattr(kernels, "_loaded", {})
    with caplog.at_level(logging.WARNING, logger="kvcellar.engine.kernels"):
        assert kernels.load_cpu_kernels(tmp_path) == kernels.CpuKernels(None, None)
        assert kernels.load_cpu_kernels(tmp_path) == kernels.CpuKernels(None, None)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no C++ compiler found" in warnings[0] and "torch's kernels" in warnings[0]


def test_an_engine_on_a_cpu_runs_its_decode_steps_through_the_kernel(tiny_model_dirs, monkeypatch) -> None:
    from kvcellar import CacheConfig, Engine

    engine = Engine.load(str(tiny_model_dirs["qwen3"]), cache=CacheConfig(enabled=False))
    try:
        kernel = attention._one_row_kernel
        if not torch.ops.kvcellar_cpu.vectorized():
            assert kernel is None  # no AVX-512: torch's path, by design
            return
        calls = []
        monkeypatch.setattr(attention, "_one_row_kernel", lambda *args: calls.append(args[3]) or kernel(*args))
        result = engine.generate(prompt_ids=list(range(10, 50)), max_tokens=3, ignore_eos=True)
        assert len(result.token_ids) == 3 and calls[:2] == [41, 41]  # every layer of the first step sees 41 keys
    finally:
        engine.close()


def _causal_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """fp32 SDPA, queries the last M of N positions -> [B, M, H, D]."""
    rows, keys = query.shape[2], key.shape[2]
    mask = torch.ones(rows, keys, dtype=torch.bool).tril(keys - rows)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query.float(), key.float(), value.float(), attn_mask=mask, enable_gqa=True, scale=scale)  # fmt: skip
    return expected.transpose(1, 2)


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(16, 8, 128), (4, 4, 64), (8, 2, 256), (6, 2, 64)])
@pytest.mark.parametrize(("rows", "keys"), [(1, 1), (5, 5), (37, 100), (300, 300), (64, 1030)])
def test_the_causal_kernel_equals_sdpa(causal, heads: int, kv_heads: int, dim: int, rows: int, keys: int) -> None:
    """bf16 dot products and bf16 probabilities: equal to fp32 SDPA within bf16 rounding."""
    generator = torch.Generator().manual_seed(rows * keys + dim)
    cached = torch.randn(1, kv_heads, keys + 9, dim, generator=generator).bfloat16()  # a buffer longer than the keys
    key, value = cached[:, :, :keys], torch.randn(1, kv_heads, keys, dim, generator=generator).bfloat16()
    query = torch.randn(1, rows, heads, dim, generator=generator).bfloat16().transpose(1, 2)  # strided, as projected
    output = causal(query, key, value, 0.1)
    assert output.shape == (1, rows, heads, dim) and output.dtype == torch.bfloat16
    torch.testing.assert_close(output.float(), _causal_reference(query, key, value, 0.1), rtol=0.02, atol=0.02)


def test_the_causal_kernel_computes_each_row_alike_in_any_pass_and_at_any_thread_count(causal) -> None:
    generator = torch.Generator().manual_seed(9)
    query = torch.randn(1, 8, 700, 64, generator=generator).bfloat16()
    key, value = torch.randn(1, 4, 700, 64, generator=generator).bfloat16(), torch.randn(1, 4, 700, 64).bfloat16()
    whole = causal(query, key, value, 0.125)
    for start, end in ((0, 1), (256, 512), (301, 333), (699, 700)):  # a later pass: its rows over the prefix before it
        assert torch.equal(causal(query[:, :, start:end], key[:, :, :end], value[:, :, :end], 0.125), whole[:, start:end])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(causal(query, key, value, 0.125), whole)
    finally:
        torch.set_num_threads(threads)


def test_prefill_passes_run_the_causal_kernel_only_where_it_applies(causal, monkeypatch) -> None:
    from torch.nn.attention.bias import causal_lower_right

    calls = []
    monkeypatch.setattr(attention, "_causal_kernel", lambda *args: calls.append(args[0].shape[2]) or causal(*args))
    module = torch.nn.Module()
    module.config, module.num_key_value_groups = None, 2
    query = torch.randn(1, 4, 10, 64).bfloat16()
    key, value = torch.randn(1, 2, 30, 64).bfloat16(), torch.randn(1, 2, 30, 64).bfloat16()
    output, _ = attention._attention(module, query, key, value, causal_lower_right(10, 30), scaling=None)
    assert calls == [10] and output.shape == (1, 10, 4, 64)
    torch.testing.assert_close(output.float(), _causal_reference(query, key, value, 64**-0.5), rtol=0.02, atol=0.02)
    attention._attention(module, query, key[:, :, :10], value[:, :, :10], None, scaling=None)  # a whole first pass
    assert calls == [10, 10]
    attention._attention(module, query.float(), key.float(), value.float(), causal_lower_right(10, 30), scaling=None)
    padding = torch.ones(1, 1, 10, 30, dtype=torch.bool)
    attention._attention(module, query, key, value, padding, scaling=None)  # a tensor mask: transformers' sdpa
    assert calls == [10, 10]  # fp32 and masked calls went to torch
