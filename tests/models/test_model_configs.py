"""Tests for kvcellar.models.configs and specs: shapes and layer kinds, without weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvcellar.errors import InvalidRequestError
from kvcellar.models import ARCHS, SIZES
from kvcellar.models.configs import build_config
from kvcellar.models.specs import SIZE_SPECS


@pytest.mark.parametrize("arch", ARCHS)
def test_0_6b_has_qwen3_0_6b_shape(arch: str) -> None:
    config = build_config(arch, "0.6b")
    assert config.hidden_size == 1024
    assert config.num_hidden_layers == 28
    assert config.num_attention_heads == 16
    assert config.num_key_value_heads == 8
    assert config.head_dim == 128
    assert config.intermediate_size == 3072
    assert config.vocab_size == 151936
    assert config.tie_word_embeddings is True
    assert config.max_position_embeddings == 40960


def test_qwen3_0_6b_parameter_count_matches_the_released_model() -> None:
    # Meta tensors: shapes only, no memory, well under a second.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(build_config("qwen3", "0.6b"))
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 596_049_920


@pytest.mark.parametrize(
    ("size", "vocab_size", "max_positions"),
    [("tiny", 2048, 2048), ("small", 8192, 8192)],
)
@pytest.mark.parametrize("arch", ARCHS)
def test_small_sizes_use_the_tokenizer_vocab(arch: str, size: str, vocab_size: int, max_positions: int) -> None:
    config = build_config(arch, size)
    assert config.vocab_size == vocab_size
    assert config.max_position_embeddings == max_positions
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (0, 2, 0)


def test_vocab_size_override() -> None:
    assert build_config("qwen3", "tiny", vocab_size=4096).vocab_size == 4096


@pytest.mark.parametrize("size", SIZES)
def test_qwen3_is_full_attention_only(size: str) -> None:
    config = build_config("qwen3", size)
    assert set(config.layer_types) == {"full_attention"}
    assert config.sliding_window is None


@pytest.mark.parametrize(("size", "window"), [("tiny", 24), ("small", 128), ("0.6b", 512)])
def test_gemma3_alternates_sliding_and_full(size: str, window: int) -> None:
    config = build_config("gemma3", size)
    assert type(config).__name__ == "Gemma3TextConfig"
    expected = ["sliding_attention", "full_attention"] * (config.num_hidden_layers // 2)
    assert config.layer_types == expected
    assert config.sliding_window == window


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ("tiny", ["linear_attention", "full_attention"] * 2),
        ("small", ["linear_attention", "linear_attention", "full_attention"] * 2),
        ("0.6b", ["linear_attention"] * 3 + ["full_attention"]),
    ],
)
def test_qwen3_5_mixes_linear_and_full_attention(size: str, expected: list[str]) -> None:
    config = build_config("qwen3_5", size)
    assert type(config).__name__ == "Qwen3_5TextConfig"
    pattern_repeats = config.num_hidden_layers // len(expected)
    assert config.layer_types == expected * pattern_repeats


@pytest.mark.parametrize(("arch", "size"), [("llama", "tiny"), ("qwen3", "huge")])
def test_unknown_choice_lists_valid_ones(arch: str, size: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        build_config(arch, size)
    choices = ARCHS if arch == "llama" else SIZES
    assert all(choice in str(info.value) for choice in choices)


def test_size_spec_rejects_a_spec_without_both_layer_kinds() -> None:
    with pytest.raises(ValueError, match="full_attention_interval"):
        dataclasses.replace(SIZE_SPECS["tiny"], full_attention_interval=1)


def test_8b_has_qwen3_8b_shape() -> None:
    config = build_config("qwen3", "8b")
    shape = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
             config.head_dim, config.intermediate_size)  # fmt: skip
    assert shape == (4096, 36, 32, 8, 128, 12288)
