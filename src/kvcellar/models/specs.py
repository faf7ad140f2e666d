"""Shapes of the random-weight models kvcellar can write.

One frozen `SizeSpec` per size name; the architecture-specific config builders
in `configs.py` read these numbers, so every architecture of one size has the
same width, depth and head layout and only the attention kinds differ.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcellar.errors import InvalidRequestError

ARCHS: tuple[str, ...] = ("qwen3", "gemma3", "qwen3_5")
SIZES: tuple[str, ...] = ("tiny", "small", "0.6b", "8b")
DTYPES: tuple[str, ...] = ("bfloat16", "float32")


@dataclass(frozen=True, slots=True)
class SizeSpec:
    """Width, depth and vocabulary of one model size.

    `model_vocab_size` None means "the tokenizer's vocabulary size"; a larger
    value keeps a real checkpoint's embedding shape while the tokenizer only
    ever emits ids below `tokenizer_vocab_size`.
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tokenizer_vocab_size: int
    model_vocab_size: int | None
    max_position_embeddings: int
    # gemma3 only: tokens a sliding-attention layer sees.
    sliding_window: int
    # qwen3_5 only: every Nth layer is full attention, the others linear.
    full_attention_interval: int
    # qwen3_5 only: the gated delta-net (linear attention) head layout.
    num_linear_key_heads: int
    num_linear_value_heads: int
    linear_head_dim: int

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention; fix the size table."
            )
        if self.num_linear_value_heads % self.num_linear_key_heads != 0:
            raise ValueError(
                f"num_linear_value_heads ({self.num_linear_value_heads}) must be a multiple of "
                f"num_linear_key_heads ({self.num_linear_key_heads}); fix the size table."
            )
        # Hybrid architectures must contain both layer kinds or the cache code
        # they exist to exercise is never reached.
        if not 2 <= self.full_attention_interval <= self.num_layers:
            raise ValueError(
                f"full_attention_interval ({self.full_attention_interval}) must be between 2 "
                f"and num_layers ({self.num_layers}) so both layer kinds occur; fix the size table."
            )
        if self.model_vocab_size is not None and self.model_vocab_size < self.tokenizer_vocab_size:
            raise ValueError(
                f"model_vocab_size ({self.model_vocab_size}) is smaller than the tokenizer's "
                f"({self.tokenizer_vocab_size}); token ids would fall outside the embedding."
            )

    @property
    def vocab_size(self) -> int:
        """Rows of the embedding matrix."""
        return self.model_vocab_size or self.tokenizer_vocab_size


SIZE_SPECS: dict[str, SizeSpec] = {
    # Milliseconds per forward on CPU; the 24-token window and 2048-token
    # context let tests wrap the window and overflow the context cheaply.
    "tiny": SizeSpec(
        hidden_size=64,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=128,
        tokenizer_vocab_size=2048,
        model_vocab_size=None,
        max_position_embeddings=2048,
        sliding_window=24,
        full_attention_interval=2,
        num_linear_key_heads=2,
        num_linear_value_heads=4,
        linear_head_dim=16,
    ),
    # The demo model: responsive on a 2-core CPU.
    "small": SizeSpec(
        hidden_size=256,
        num_layers=6,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        intermediate_size=768,
        tokenizer_vocab_size=8192,
        model_vocab_size=None,
        max_position_embeddings=8192,
        sliding_window=128,
        full_attention_interval=3,
        num_linear_key_heads=4,
        num_linear_value_heads=8,
        linear_head_dim=64,
    ),
    # Qwen3-0.6B's shape (incl. its 151936-row embedding) for realistic
    # memory and speed measurements; the weights are still random.
    "0.6b": SizeSpec(
        hidden_size=1024,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=3072,
        tokenizer_vocab_size=8192,
        model_vocab_size=151936,
        max_position_embeddings=40960,
        sliding_window=512,
        full_attention_interval=4,
        num_linear_key_heads=16,
        num_linear_value_heads=16,
        linear_head_dim=128,
    ),
    # Qwen3-8B's shape, for GPU measurements (build it with init_device="cuda": 16 GB of bf16 weights).
    "8b": SizeSpec(
        hidden_size=4096,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=12288,
        tokenizer_vocab_size=8192,
        model_vocab_size=151936,
        max_position_embeddings=40960,
        sliding_window=1024,
        full_attention_interval=4,
        num_linear_key_heads=16,
        num_linear_value_heads=32,
        linear_head_dim=128,
    ),
}


def _check_choice(kind: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidRequestError(
            f"unknown model {kind} {value!r}; choose one of: {', '.join(choices)}"
        )


def check_arch(arch: str) -> None:
    """Raise InvalidRequestError listing the valid architectures if `arch` is not one."""
    _check_choice("architecture", arch, ARCHS)


def check_dtype(dtype: str) -> None:
    """Raise InvalidRequestError listing the valid dtypes if `dtype` is not one."""
    _check_choice("dtype", dtype, DTYPES)


def size_spec(size: str) -> SizeSpec:
    """The spec of a size name; InvalidRequestError listing the valid sizes otherwise."""
    _check_choice("size", size, SIZES)
    return SIZE_SPECS[size]
