"""Transformers configs for each architecture at each size, without weights.

`build_config(arch, size)` is cheap (no tensors), so tests can check the
0.6b shape without building a 0.6B-parameter model. One small builder per
architecture, chosen from a table.

Layer kinds (`config.layer_types`):
- qwen3: `full_attention` everywhere.
- gemma3: `sliding_attention` and `full_attention` alternating, starting
  with sliding (real Gemma 3 uses 5 sliding : 1 full; alternating puts both
  kinds in even a 4-layer model).
- qwen3_5: `linear_attention` (gated delta-net) with every
  `full_attention_interval`-th layer `full_attention`, as in Qwen3.5.
"""

from __future__ import annotations

from typing import Callable

from transformers import Gemma3TextConfig, PretrainedConfig, Qwen3_5TextConfig, Qwen3Config

from kvcellar.models.specs import SizeSpec, check_arch, size_spec
from kvcellar.models.tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID

GEMMA3_FULL_ATTENTION_INTERVAL = 2
# With the default 0.02, random Qwen3 / Qwen3.5 models echo one token forever
# under greedy decoding (tied embeddings dominate the residual stream), which
# makes a poor demo and lets "same tokens with and without the cache" checks
# pass vacuously. 0.15 gives context-dependent output (tiny and small: ~30
# distinct tokens in 30 greedy steps) with finite bf16 logits. Gemma 3 keeps
# 0.02: its sandwich norms already give every sublayer unit scale, and a
# larger init only inflates its sqrt(hidden)-scaled embeddings, which makes
# its output collapse instead.
QWEN_INITIALIZER_RANGE = 0.15


def interleaved_layer_types(num_layers: int, interval: int, other_kind: str) -> list[str]:
    """`other_kind` everywhere except every `interval`-th layer (1-based), which is full attention."""
    return ["full_attention" if (i + 1) % interval == 0 else other_kind for i in range(num_layers)]


def _common_kwargs(spec: SizeSpec, vocab_size: int) -> dict:
    """Fields every architecture's config spells the same way."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        # Tied like Qwen3-0.6B and Gemma 3: halves the file of the small sizes.
        tie_word_embeddings=True,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
    )


def _qwen3_config(spec: SizeSpec, vocab_size: int) -> PretrainedConfig:
    return Qwen3Config(
        **_common_kwargs(spec, vocab_size),
        # transformers defaults to 10k; the released Qwen3 checkpoints use 1M.
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        use_sliding_window=False,
        initializer_range=QWEN_INITIALIZER_RANGE,
        layer_types=["full_attention"] * spec.num_layers,
    )


def _gemma3_config(spec: SizeSpec, vocab_size: int) -> PretrainedConfig:
    return Gemma3TextConfig(
        **_common_kwargs(spec, vocab_size),
        sliding_window=spec.sliding_window,
        layer_types=interleaved_layer_types(spec.num_layers, GEMMA3_FULL_ATTENTION_INTERVAL, "sliding_attention"),
        # Gemma 3 scales queries by 1/sqrt(query_pre_attn_scalar), which
        # equals head_dim in the released checkpoints.
        query_pre_attn_scalar=spec.head_dim,
    )


def _qwen3_5_config(spec: SizeSpec, vocab_size: int) -> PretrainedConfig:
    return Qwen3_5TextConfig(
        **_common_kwargs(spec, vocab_size),
        # As released: theta 10M, rotary on a quarter of each head's dims.
        rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25},
        layer_types=interleaved_layer_types(spec.num_layers, spec.full_attention_interval, "linear_attention"),
        linear_num_key_heads=spec.num_linear_key_heads,
        linear_num_value_heads=spec.num_linear_value_heads,
        linear_key_head_dim=spec.linear_head_dim,
        linear_value_head_dim=spec.linear_head_dim,
        initializer_range=QWEN_INITIALIZER_RANGE,
    )


_CONFIG_BUILDERS: dict[str, Callable[[SizeSpec, int], PretrainedConfig]] = {
    "qwen3": _qwen3_config,
    "gemma3": _gemma3_config,
    "qwen3_5": _qwen3_5_config,
}


def build_config(arch: str, size: str, vocab_size: int | None = None) -> PretrainedConfig:
    """The transformers config of `arch` at `size`; `vocab_size` None takes the size's default."""
    check_arch(arch)
    spec = size_spec(size)
    return _CONFIG_BUILDERS[arch](spec, vocab_size if vocab_size is not None else spec.vocab_size)
