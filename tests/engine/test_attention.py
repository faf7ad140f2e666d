"""`kvcellar_sdpa`: a lower-right causal bias instead of a dense mask, and the same outputs as transformers' sdpa."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.bias import CausalBias, causal_lower_right
from transformers import AutoModelForCausalLM
from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

from kvcellar.engine import attention
from kvcellar.engine.prefill import cache_argument
from kvcellar.kv.growing_layer import new_cache


def test_the_mask_is_a_lower_right_bias_only_for_plain_causal_chunks_on_a_prefix() -> None:
    base = {"batch_size": 1, "mask_function": causal_mask_function, "attention_mask": None, "device": "cpu"}
    chunk = attention._mask(**base, q_length=4, kv_length=10, q_offset=6, kv_offset=0)
    assert isinstance(chunk, CausalBias) and (chunk.seq_len_q, chunk.seq_len_kv) == (4, 10)
    dense = chunk._materialize()
    assert dense[0].tolist() == [True] * 7 + [False] * 3 and dense[-1].all()
    assert attention._mask(**base, q_length=10, kv_length=10, q_offset=0, kv_offset=0) is None  # is_causal path
    assert attention._mask(**base, q_length=1, kv_length=10, q_offset=9, kv_offset=0) is None  # a decode step
    sliding = dict(base, mask_function=sliding_window_causal_mask_function(3), local_size=3)
    assert isinstance(attention._mask(**sliding, q_length=4, kv_length=10, q_offset=6, kv_offset=0), torch.Tensor)
    padded = dict(base, attention_mask=torch.ones(1, 10, dtype=torch.bool))
    assert not isinstance(attention._mask(**padded, q_length=4, kv_length=10, q_offset=6, kv_offset=0), CausalBias)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_chunked_prefill_with_it_matches_transformers_sdpa(tiny_fp32_dirs, arch, monkeypatch) -> None:
    biases = []
    monkeypatch.setattr(attention, "causal_lower_right", lambda *shape: biases.append(shape) or causal_lower_right(*shape))
    ids = torch.randint(3, 200, (1, 37), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name in ("sdpa", attention.register()):
        model = AutoModelForCausalLM.from_pretrained(tiny_fp32_dirs[arch], attn_implementation=name).eval()
        cache = new_cache(model.config, 37, None)
        with torch.inference_mode():
            outputs = [model(input_ids=ids[:, s : s + 8], **cache_argument(model, cache), use_cache=True).logits
                       for s in range(0, 37, 8)]
        logits[name] = torch.cat(outputs, dim=1)
    assert biases[:4] == [(8, 16), (8, 24), (8, 32), (5, 37)]  # every chunk after the first took the bias path
    torch.testing.assert_close(logits[attention.NAME], logits["sdpa"], rtol=1e-5, atol=1e-5)


def test_the_cpu_split_equals_one_masked_pass() -> None:
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(1, 4, 5, 8, generator=generator)  # 5 new queries, 4 heads
    key, value = torch.randn(1, 2, 12, 8, generator=generator), torch.randn(1, 2, 12, 8, generator=generator)  # 7 cached
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=causal_lower_right(5, 12)._materialize(), enable_gqa=True
    )
    torch.testing.assert_close(attention._split_causal_cpu(query, key, value, None), expected, rtol=1e-5, atol=1e-6)


def test_a_cpu_decode_step_equals_sdpa_over_grouped_heads() -> None:
    torch.manual_seed(0)
    query = torch.randn(1, 8, 1, 32)
    key, value = torch.randn(1, 2, 300, 32), torch.randn(1, 2, 300, 32)  # 4 query heads per K/V head
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, enable_gqa=True)
    for scale in (None, 0.125):
        reference = expected if scale is None else torch.nn.functional.scaled_dot_product_attention(
            query, key, value, enable_gqa=True, scale=scale)  # fmt: skip
        assert torch.allclose(attention._decode_cpu(query, key, value, scale), reference, atol=1e-6)
    module = torch.nn.Module()
    module.config = None
    output, _ = attention._attention(module, query, key[:, :, :200], value[:, :, :200], None, scaling=None)
    assert output.shape == (1, 1, 8, 32)  # [B, q, H, D], as transformers' attention functions return
    assert torch.allclose(output.transpose(1, 2), attention._decode_cpu(query, key[:, :, :200], value[:, :, :200], None))
    with pytest.raises(ValueError, match="softcap"):  # soft-capping is left to transformers, which refuses it for sdpa
        attention._attention(module, query, key, value, None, scaling=None, softcap=30.0)
