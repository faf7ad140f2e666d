"""Offline byte-level BPE tokenizer for the random-weight models.

Operations:
- `trained_tokenizer_json(vocab_size)`: train (once per process and vocab
  size) on the local Python standard library sources and return tokenizer.json
  text. Deterministic for one Python installation: sorted file list, fixed
  text cap, and the `tokenizers` BPE trainer breaks count ties by pair order.
- `build_tokenizer(vocab_size)`: wrap it as a `PreTrainedTokenizerFast` with
  the ChatML special tokens and chat template, ready for `save_pretrained`.

The pre-tokenizer, normalizer and decoder copy Qwen3.5's pipeline. Model
specific tokenizer classes (`Qwen2Tokenizer`, `Qwen3_5Tokenizer`, which
transformers picks for some model types) ignore the pipeline stored in
tokenizer.json and rebuild their own from the vocab and merges; with the same
pipeline, every way of loading a folder tokenizes identically.
"""

from __future__ import annotations

import functools
import sysconfig
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
THINK_START_TOKEN = "<think>"
THINK_END_TOKEN = "</think>"

# The trainer gives special tokens the first ids in this order; configs rely
# on these ids (checked in `build_tokenizer`).
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, IM_START_TOKEN, EOS_TOKEN, THINK_START_TOKEN, THINK_END_TOKEN)
PAD_TOKEN_ID = 0
IM_START_TOKEN_ID = 1
EOS_TOKEN_ID = 2
# Qwen-style models prepend no BOS; `<|endoftext|>` doubles as the declared
# BOS so tools that require one find it, but nothing adds it automatically.
BOS_TOKEN_ID = PAD_TOKEN_ID

# Qwen3.5's split regex (transformers/models/qwen3_5/tokenization_qwen3_5.py).
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"""
    r"""| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Caps the training text, so building a tokenizer stays quick; more text barely
# changes the merges of a vocabulary this small.
_CORPUS_CHAR_CAP = 2_000_000
_MIN_VOCAB_SIZE = 512


def _stdlib_corpus(char_cap: int = _CORPUS_CHAR_CAP) -> list[str]:
    """Text of the standard library's top-level .py files, sorted by name, capped."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    remaining = char_cap
    for path in sorted(stdlib.glob("*.py")):
        if remaining <= 0:
            break
        text = path.read_text(encoding="utf-8", errors="replace")[:remaining]
        texts.append(text)
        remaining -= len(text)
    if not texts:
        raise RuntimeError(
            f"no Python sources found under {stdlib} to train the tokenizer on; "
            "use a Python installation that ships its standard library sources."
        )
    return texts


@functools.lru_cache(maxsize=None)
def trained_tokenizer_json(vocab_size: int) -> str:
    """tokenizer.json text of a byte-level BPE with `vocab_size` entries (cached per process)."""
    if vocab_size < _MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {_MIN_VOCAB_SIZE}, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols, so any text encodes even if the corpus lacks a byte.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_stdlib_corpus(), trainer=trainer)
    # Like Qwen3, the reasoning markers are added tokens but not "special":
    # decoding with skip_special_tokens keeps them visible.
    tokenizer.add_tokens(
        [AddedToken(token, special=False, normalized=False) for token in (THINK_START_TOKEN, THINK_END_TOKEN)]
    )
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(
            f"tokenizer training produced {tokenizer.get_vocab_size()} tokens instead of {vocab_size}; "
            "the local training text is too small for this vocabulary size."
        )
    return tokenizer.to_str()


def chat_template() -> str:
    """The ChatML (Qwen3-style) Jinja chat template shipped as package data."""
    return resources.files(__package__).joinpath("chat_template.jinja").read_text(encoding="utf-8")


def build_tokenizer(vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """A fresh tokenizer object with special tokens, chat template and context length set."""
    backend = Tokenizer.from_str(trained_tokenizer_json(vocab_size))
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert backend.token_to_id(token) == token_id, f"{token} must have id {token_id}"
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        extra_special_tokens=[IM_START_TOKEN],
        chat_template=chat_template(),
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
