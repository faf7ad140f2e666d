"""fp32 compute on bf16-stored weights (engine/weights.py, dtype `float32-bf16-weights`).

A prefill is bit-identical to the fp32 model's; the weights take half the bytes; only values bf16
holds exactly are moved; one-row passes run the compiled kernel and fall back to a bf16 linear, with
one warning, where compiling fails; exact mode still holds with the cache.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from kvcellar import Engine
from kvcellar.config import FP32_WEIGHTS_FROM_ROWS, CacheConfig, EngineConfig
from kvcellar.engine import loader, weights
from kvcellar.engine.loader import load_model
from kvcellar.engine.weights import Bf16StoredLinear, store_weights_in_bf16
from kvcellar.errors import ModelLoadError
from kvcellar.kv.growing_layer import new_cache

ARCHS = ("qwen3", "gemma3", "qwen3_5")


@pytest.fixture(scope="module")
def pairs(tiny_model_dirs):
    """arch -> (the bf16 checkpoint run in fp32, the same run on bf16-stored weights)."""
    return {arch: (load_model(tiny_model_dirs[arch], "cpu", "float32"),
                   load_model(tiny_model_dirs[arch], "cpu", "float32-bf16-weights")) for arch in ARCHS}  # fmt: skip


def _prefill(loaded, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    cache = new_cache(loaded.model.config, ids.shape[1] + 8, None)
    with torch.inference_mode():
        logits = loaded.model(input_ids=ids, past_key_values=cache, use_cache=True).logits
    states = [tensor for layer in cache.layers for name, tensor in vars(layer).items()
              if isinstance(tensor, torch.Tensor) and not name.startswith("_")]  # not a buffer's unwritten tail
    return logits, [state.clone() for state in states]


@pytest.mark.parametrize("arch", ARCHS)
def test_a_prefill_is_bit_identical_to_the_fp32_model(pairs, arch) -> None:
    fp32, stored = pairs[arch]
    assert stored.precision == "float32-bf16-weights" and fp32.precision == "float32"
    ids = torch.arange(3, 3 + 2 * FP32_WEIGHTS_FROM_ROWS + 5).unsqueeze(0)
    logits, states = _prefill(fp32, ids)
    logits_stored, states_stored = _prefill(stored, ids)
    assert torch.equal(logits, logits_stored)  # every row's logits: a pass of many rows runs fp32 throughout
    assert len(states) == len(states_stored) > 0
    assert all(torch.equal(a, b) for a, b in zip(states, states_stored, strict=True))


@pytest.mark.parametrize("arch", ARCHS)
def test_the_weights_take_half_the_bytes(pairs, arch) -> None:
    fp32, stored = pairs[arch]
    kept = {"lm_head"} if arch == "gemma3" else set()  # tied to a scaled embedding (the next test)
    linears = [name for name, module in fp32.model.named_modules() if type(module) is nn.Linear and name not in kept]
    modules = dict(stored.model.named_modules())
    assert linears and all(isinstance(modules[name], Bf16StoredLinear) for name in linears)
    assert all(modules[name].weight.dtype == torch.bfloat16 for name in linears)
    before = {id(p): p.numel() * 4 for name in linears for p in [dict(fp32.model.named_modules())[name].weight]}
    after = {id(p): p.numel() * 2 for name in linears for p in [modules[name].weight]}
    assert sum(after.values()) * 2 == sum(before.values())  # a tied head and embedding share one copy


def test_a_scaled_embedding_keeps_its_tied_head_in_fp32(pairs) -> None:
    _, stored = pairs["gemma3"]  # Gemma3's embedding multiplies by a scale in the weight's dtype
    model = stored.model
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert type(model.get_output_embeddings()) is nn.Linear


def test_values_bf16_cannot_hold_stay_fp32(tiny_fp32_dirs) -> None:
    loaded = load_model(tiny_fp32_dirs["qwen3"], "cpu", "float32-bf16-weights")  # random fp32 values
    assert loaded.precision == "float32" and loaded.weight_dtype is None
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    layer = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.5, 2.0, -3.0]] * 3))
        layer.weight[1, 1] = 1.0 + 2**-12  # one value between two bf16 numbers
    assert store_weights_in_bf16(nn.Sequential(layer), None).num_fp32 == 1
    assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32


def _stored_linear(kernel_dir) -> Bf16StoredLinear:
    torch.manual_seed(0)
    layer = nn.Linear(64, 48)
    with torch.no_grad():
        layer.weight.copy_(layer.weight.to(torch.bfloat16).float())
    store_weights_in_bf16(nn.Sequential(layer), kernel_dir)
    assert isinstance(layer, Bf16StoredLinear)
    return layer


def test_each_pass_length_takes_its_path(tmp_path) -> None:
    layer = _stored_linear(tmp_path)
    assert layer.one_row is not None and layer.few_rows == FP32_WEIGHTS_FROM_ROWS - 1  # the built kernels
    weight, bias = layer.weight.float(), layer.bias
    with torch.inference_mode():
        long = torch.randn(2, FP32_WEIGHTS_FROM_ROWS // 2, 64)  # 16 rows in all: fp32, bit for bit
        assert torch.equal(layer(long), nn.functional.linear(long, weight, bias))
        short = torch.randn(1, 5, 64)  # a decode batch: fp32 sums of the bf16 weights, each row as alone
        assert torch.allclose(layer(short), nn.functional.linear(short, weight, bias), rtol=1e-5, atol=1e-5)
        assert not torch.equal(layer(short), _bf16_linear(short, layer))
        alone = torch.cat([layer(short[:, i : i + 1]) for i in range(5)], dim=1)
        assert torch.equal(layer(short), alone)


def test_without_the_built_kernels_one_row_takes_the_compiled_kernel(tmp_path, monkeypatch) -> None:
    from kvcellar.engine.kernels import CpuKernels

    monkeypatch.setattr(weights, "load_cpu_kernels", lambda kernel_dir: CpuKernels())  # isolates the fallback
    layer = _stored_linear(tmp_path)
    assert layer.one_row is not None and layer.few_rows == 1
    assert [file.name for file in tmp_path.iterdir()] == [f"one-row-product-torch{torch.__version__}.pt2"]
    assert _stored_linear(tmp_path).one_row is not None  # loaded from the package the first one built
    weight, bias = layer.weight.float(), layer.bias
    with torch.inference_mode():
        row = torch.randn(1, 1, 64)  # one row: the compiled kernel, fp32 sums of the bf16 weights
        assert torch.allclose(layer(row), nn.functional.linear(row, weight, bias), rtol=1e-5, atol=1e-5)
        assert not torch.equal(layer(row), _bf16_linear(row, layer))
        short = torch.randn(1, 3, 64)  # a short tail: a bf16 linear
        assert torch.equal(layer(short), _bf16_linear(short, layer))


class _Projections(nn.Module):
    """Attention's three projections of one input, as transformers' models name them."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(64, 32, bias=False)
        self.k_proj, self.v_proj = nn.Linear(64, 16, bias=False), nn.Linear(64, 16, bias=False)
        with torch.no_grad():
            for layer in (self.q_proj, self.k_proj, self.v_proj):
                layer.weight.copy_(torch.randn_like(layer.weight).to(torch.bfloat16).float())


def test_sibling_projections_share_one_weight_tensor_and_one_product(tmp_path) -> None:
    torch.manual_seed(1)
    block = _Projections()
    separate = {name: getattr(block, name).weight.detach().clone() for name in ("q_proj", "k_proj", "v_proj")}
    store_weights_in_bf16(block, tmp_path)
    q, k, v = block.q_proj, block.k_proj, block.v_proj
    assert q.siblings is k.siblings is v.siblings is not None
    assert q.weight.untyped_storage().data_ptr() == v.weight.untyped_storage().data_ptr()  # views: no second copy
    calls = []
    kernel = q.one_row
    for layer in (q, k, v):
        layer.one_row = lambda row, weight: calls.append(tuple(weight.shape)) or kernel(row, weight)
    with torch.inference_mode():
        row = torch.randn(1, 1, 64)
        outputs = [layer(row) for layer in (q, k, v)]
        assert calls == [(64, 64)]  # one product for the three
        for output, name in zip(outputs, ("q_proj", "k_proj", "v_proj"), strict=True):
            assert torch.equal(output, kernel(row.reshape(1, 64), separate[name].to(torch.bfloat16)).view(1, 1, -1))
        calls.clear()
        other = torch.randn(1, 1, 64)  # k called on another input than q's: its own product, never q's stale one
        assert torch.equal(k(other), kernel(other.reshape(1, 64), separate["k_proj"].to(torch.bfloat16)).view(1, 1, -1))
        assert calls == [(16, 64)]
        long = torch.randn(1, FP32_WEIGHTS_FROM_ROWS, 64)  # a prefill: each its own fp32 product, bit for bit
        assert torch.equal(v(long), nn.functional.linear(long, separate["v_proj"]))


def test_a_bf16_models_one_row_passes_run_the_kernel(tmp_path, tiny_model_dirs) -> None:
    torch.manual_seed(2)
    layer = nn.Linear(64, 48).to(torch.bfloat16)
    plain = nn.Linear(64, 48).to(torch.bfloat16)
    plain.load_state_dict(layer.state_dict())
    assert weights.use_one_row_kernel(nn.Sequential(layer), tmp_path) == 1
    assert isinstance(layer, weights.Bf16Linear) and layer.one_row is not None
    with torch.inference_mode():
        long = torch.randn(1, FP32_WEIGHTS_FROM_ROWS, 64).to(torch.bfloat16)  # a prefill: torch's bf16 product
        assert torch.equal(layer(long), plain(long))
        rows = torch.randn(1, 5, 64).to(torch.bfloat16)  # a decode batch: fp32 sums, rounded to bf16 once
        expected = (nn.functional.linear(rows.float(), layer.weight.float()) + layer.bias.float()).to(torch.bfloat16)
        assert layer(rows).dtype == torch.bfloat16
        assert torch.allclose(layer(rows).float(), expected.float(), rtol=2**-7, atol=1e-3)
        assert torch.equal(layer(rows), torch.cat([layer(rows[:, i : i + 1]) for i in range(5)], dim=1))
    loaded = load_model(tiny_model_dirs["qwen3"], "cpu", "bfloat16")
    assert {type(module).__name__ for name, module in loaded.model.named_modules() if name.endswith("proj")} == {"Bf16Linear"}
    assert loaded.model.model.layers[0].self_attn.k_proj.siblings is not None
    assert loaded.model.model.layers[0].mlp.up_proj.packed is not None  # a tiny model fits any machine's budget


def test_prepacked_weights_multiply_several_rows_bit_for_bit_as_linear(tmp_path, monkeypatch) -> None:
    from kvcellar.engine import prepacked

    torch.manual_seed(3)
    layer = nn.Linear(96, 160).to(torch.bfloat16)
    plain = nn.Linear(96, 160).to(torch.bfloat16)
    plain.load_state_dict(layer.state_dict())
    weights.use_one_row_kernel(nn.Sequential(layer), tmp_path)
    assert layer.packed is not None
    calls = []
    product = prepacked.packed_product
    monkeypatch.setattr(weights, "packed_product", lambda *args: calls.append(args[0].shape) or product(*args))
    with torch.inference_mode():
        for rows in (16, 64, 257):
            x = torch.randn(1, rows, 96).to(torch.bfloat16)
            assert torch.equal(layer(x), plain(x))
        one = torch.randn(1, 1, 96).to(torch.bfloat16)  # decode rows: the few-rows kernel, the same bits in any batch
        batch = torch.cat([one, torch.randn(1, 6, 96).to(torch.bfloat16)], dim=1)
        calls.clear()
        assert torch.equal(layer(one), layer(batch)[:, :1]) and not calls


def test_weights_stay_unpacked_where_a_packed_copy_would_not_fit(tmp_path, monkeypatch, caplog) -> None:
    import logging

    from kvcellar.engine import prepacked

    monkeypatch.setattr(prepacked, "machine_memory", lambda: 4 * 96 * 160 * 2)  # the copy is a quarter and more
    layer = nn.Linear(96, 160, bias=False).to(torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="kvcellar.engine.prepacked"):
        weights.use_one_row_kernel(nn.Sequential(layer, nn.Linear(96, 96, bias=False).to(torch.bfloat16)), tmp_path)
    assert layer.packed is None and "stay unpacked" in caplog.text


def _bf16_linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    return nn.functional.linear(x.to(torch.bfloat16), layer.weight).float() + layer.bias


def test_a_failed_build_falls_back_to_bf16_linears_with_one_warning(monkeypatch, caplog, tmp_path) -> None:
    # Isolates the fallback: building the kernel fails, as it does without a C++ compiler.
    def broken(kernel_dir):
        raise RuntimeError("InductorError: CppCompileError: no C++ compiler found\nlong build log")

    from kvcellar.engine.kernels import CpuKernels

    monkeypatch.setattr(weights, "load_cpu_kernels", lambda kernel_dir: CpuKernels())  # nor the built kernels
    monkeypatch.setattr(weights, "_load_or_build", broken)
    with caplog.at_level(logging.WARNING, logger="kvcellar.engine.weights"):
        layer = _stored_linear(tmp_path)
    assert layer.one_row is None
    assert caplog.text.count("building the one-row kernel") == 1 and "no C++ compiler found" in caplog.text
    assert "long build log" not in caplog.text
    with torch.inference_mode():
        row = torch.randn(1, 64)
        assert torch.equal(layer(row), _bf16_linear(row, layer))


def test_exact_mode_holds_on_stored_weights(tiny_model_dirs) -> None:
    ids = [(7 * i + 3) % 400 + 10 for i in range(70)]
    outputs = []
    for cache in (CacheConfig(exact=True, cost_model=False), CacheConfig(enabled=False)):
        with Engine.load(str(tiny_model_dirs["qwen3"]), dtype="float32-bf16-weights", block_size=16, cache=cache) as engine:
            assert engine.loaded.precision == "float32-bf16-weights"
            first = engine.generate(prompt_ids=ids, max_tokens=8, temperature=0.0)
            again = engine.generate(prompt_ids=ids + [11, 12], max_tokens=8, temperature=0.0)
            outputs.append((first.token_ids, again.token_ids, again.num_cached_tokens))
    (first, again, cached), (first_cold, again_cold, _) = outputs
    assert cached >= 48  # the second prompt restored shared blocks (the row-invariant rule leaves >= 16 to compute)
    assert first == first_cold and again == again_cold


def test_the_dtype_is_named_and_refused_off_cpu(monkeypatch) -> None:
    assert EngineConfig("m", dtype="fp32-bf16w").dtype == "float32-bf16-weights"
    # Isolates the refusal: the device resolves to a GPU without one being here; it comes before any loading.
    monkeypatch.setattr(loader, "resolve_device", lambda name: torch.device("cuda"))
    with pytest.raises(ModelLoadError, match="float32-bf16-weights is for CPUs"):
        load_model("/nonexistent", "cuda", "float32-bf16-weights")
