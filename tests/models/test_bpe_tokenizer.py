"""Tests for kvcellar.models.tokenizer: determinism, special tokens, loaders agree."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer, Qwen2Tokenizer
from transformers.models.qwen3_5.tokenization_qwen3_5 import Qwen3_5Tokenizer

import kvcellar.models
from kvcellar.models.tokenizer import SPECIAL_TOKENS, trained_tokenizer_json

SAMPLE = "<|im_start|>user\nHello wörld, can't DON'T ﬁ 123\n\tdef f(x):\n    return x<think>hm</think><|im_end|>"
SRC_DIR = Path(kvcellar.models.__file__).resolve().parents[2]


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_training_is_deterministic_across_processes(tiny_model_dirs: dict[str, Path]) -> None:
    # A new process gets new (random) hash seeds inside the Rust trainer; the
    # merges must not depend on them.
    script = (
        "import hashlib; from kvcellar.models.tokenizer import trained_tokenizer_json as t; "
        "print(hashlib.sha256(t(2048).encode()).hexdigest())"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC_DIR)}
    other = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert other.stdout.strip() == _sha256(trained_tokenizer_json(2048))
    # The folder's tokenizer.json is the same tokenizer (special-token
    # settings aside), so every tiny folder shares one vocabulary.
    folder_vocabs = {
        arch: Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab() for arch, path in tiny_model_dirs.items()
    }
    trained_vocab = Tokenizer.from_str(trained_tokenizer_json(2048)).get_vocab()
    assert all(vocab == trained_vocab for vocab in folder_vocabs.values())


def test_vocab_size_and_special_token_ids() -> None:
    tokenizer = Tokenizer.from_str(trained_tokenizer_json(2048))
    assert tokenizer.get_vocab_size() == 2048
    assert [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    special = {added.content: added.special for added in tokenizer.get_added_tokens_decoder().values()}
    # Like Qwen3: ChatML markers are special, reasoning markers are not.
    assert special == {
        "<|endoftext|>": True,
        "<|im_start|>": True,
        "<|im_end|>": True,
        "<think>": False,
        "</think>": False,
    }


def test_too_small_vocab_is_refused() -> None:
    with pytest.raises(ValueError, match="at least"):
        trained_tokenizer_json(16)


def test_auto_tokenizer_settings(tiny_model_dirs: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["qwen3"])
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 0)
    assert tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.model_max_length == 2048
    assert len(tokenizer) == 2048
    ids = tokenizer.encode(SAMPLE)
    assert ids[0] == 1 and ids[-1] == 2  # no BOS is prepended, Qwen style
    assert tokenizer.decode(ids) == SAMPLE
    assert tokenizer.decode(ids, skip_special_tokens=True).startswith("user\nHello")


@pytest.mark.parametrize("arch", ["qwen3", "gemma3", "qwen3_5"])
def test_every_loader_tokenizes_like_tokenizer_json(arch: str, tiny_model_dirs: dict[str, Path]) -> None:
    folder = tiny_model_dirs[arch]
    expected = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(SAMPLE).ids
    # The Qwen classes rebuild their own pre-tokenizer from vocab + merges;
    # ours copies Qwen3.5's, so they must agree with tokenizer.json.
    for loader in (AutoTokenizer, Qwen2Tokenizer, Qwen3_5Tokenizer):
        assert loader.from_pretrained(folder).encode(SAMPLE) == expected, loader.__name__
