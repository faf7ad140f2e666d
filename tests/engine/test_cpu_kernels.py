"""The CPU decode-attention kernel (engine/kernels): built from source, equal to SDPA, alike at every thread count,
used by decode steps, and a warning plus torch's path where it cannot be built."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from kvcellar.engine import attention, kernels


@pytest.fixture(scope="module")
def op(tmp_path_factory: pytest.TempPathFactory):
    """The kernel op, built once for the module (the build is cached per process after)."""
    built = kernels._build(tmp_path_factory.mktemp("kernels"))
    assert built is torch.ops.kvcellar_cpu.one_row_attention
    return built


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
        query = torch.randn(2, heads, dim, generator=generator)
        output = op((query * dim**-0.5).contiguous(), key, value, num_keys)
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
            outputs.append(op(query, key, value, 2900))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outputs[0], other) for other in outputs[1:])


def test_the_kernel_refuses_what_it_cannot_read(op) -> None:
    key = torch.randn(1, 2, 10, 8)
    with pytest.raises(RuntimeError, match="num_keys within the buffers"):
        op(torch.randn(1, 4, 8), key, key, 11)
    with pytest.raises(RuntimeError, match="rows contiguous"):
        op(torch.randn(1, 4, 8), key.transpose(2, 3).contiguous().transpose(2, 3), key, 5)


def test_decode_steps_run_the_kernel_and_torchs_path_agrees(op, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(attention, "_one_row_kernel", lambda *args: calls.append(args[3]) or op(*args))
    generator = torch.Generator().manual_seed(5)
    query = torch.randn(1, 8, 1, 64, generator=generator).bfloat16()
    key, value = torch.randn(1, 2, 400, 64, generator=generator).bfloat16(), torch.randn(1, 2, 400, 64).bfloat16()
    with_kernel = attention._decode_cpu(query, key[:, :, :300], value[:, :, :300], None)
    assert calls == [300] and with_kernel.dtype == torch.bfloat16 and with_kernel.shape == (1, 8, 1, 64)
    attention.use_one_row_kernel(None)  # monkeypatch restores the kernel after
    without = attention._decode_cpu(query, key[:, :, :300], value[:, :, :300], None)
    torch.testing.assert_close(with_kernel.float(), without.float(), rtol=0.02, atol=0.02)  # bf16 products in torch's


def test_a_failed_build_warns_once_and_leaves_torchs_path(tmp_path: Path, monkeypatch, caplog) -> None:
    def broken(kernel_dir: Path):
        raise OSError("no C++ compiler found")

    monkeypatch.setattr(kernels, "_build", broken)
    monkeypatch.setattr(kernels, "_loaded", {})
    with caplog.at_level(logging.WARNING, logger="kvcellar.engine.kernels"):
        assert kernels.load_one_row_attention(tmp_path) is None
        assert kernels.load_one_row_attention(tmp_path) is None
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no C++ compiler found" in warnings[0] and "torch's attention" in warnings[0]


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
