"""Tests for kvcellar/models/chat_template.jinja, rendered through a loaded tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from kvcellar.models.tokenizer import chat_template


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dirs: dict[str, Path]):
    return AutoTokenizer.from_pretrained(tiny_model_dirs["qwen3"])


def render(tokenizer, messages: list[dict], **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def test_folder_carries_the_package_template(tiny_model_dirs: dict[str, Path]) -> None:
    for folder in tiny_model_dirs.values():
        assert (folder / "chat_template.jinja").read_text(encoding="utf-8") == chat_template()


def test_chatml_turns_and_generation_prompt(tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    turns = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert render(tokenizer, messages) == turns
    assert render(tokenizer, messages, add_generation_prompt=True) == turns + "<|im_start|>assistant\n"


def test_enable_thinking_false_appends_an_empty_reasoning_block(tokenizer) -> None:
    rendered = render(tokenizer, [{"role": "user", "content": "Hi"}], add_generation_prompt=True, enable_thinking=False)
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_reasoning_is_dropped_before_the_last_user_turn_and_kept_after(tokenizer) -> None:
    messages = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>\nstep one\n</think>\n\nA1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "<think>\nstep two\n</think>\n\nA2"},
    ]
    assert render(tokenizer, messages) == (
        "<|im_start|>user\nQ1<|im_end|>\n"
        "<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nstep two\n</think>\n\nA2<|im_end|>\n"
    )


def test_tool_turns_and_empty_content(tokenizer) -> None:
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None},
        {"role": "tool", "content": "sunny"},
    ]
    assert render(tokenizer, messages) == (
        "<|im_start|>user\nweather?<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n<|im_start|>tool\nsunny<|im_end|>\n"
    )


def test_unknown_role_is_refused(tokenizer) -> None:
    with pytest.raises(Exception, match="unknown message role 'robot'"):
        render(tokenizer, [{"role": "robot", "content": "beep"}])


def test_tokenized_template_uses_the_special_token_ids(tokenizer) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids[0] == 1  # <|im_start|>
    assert ids.count(1) == 2 and ids.count(2) == 1  # two turn openings, one <|im_end|>
    assert tokenizer.decode(ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
