"""Reasoning split from the reply (chat/reasoning.py): whole, streamed in pieces of every size, and where
the template's generation prompt opened the block."""

from __future__ import annotations

import pytest

from kvcellar.chat.reasoning import ReasoningStream, marks_reasoning, opens_in_reasoning, split_reasoning

ANSWER = "<think>\nThe user wants a city.\n</think>\n\nParis."


def test_a_leading_block_is_the_reasoning_and_the_rest_the_content():
    assert split_reasoning(ANSWER) == ("\nThe user wants a city.\n", "Paris.")
    assert split_reasoning("Paris.") == (None, "Paris.")
    assert split_reasoning("Well <think>x</think> y") == (None, "Well <think>x</think> y")  # not leading: content


def test_a_block_opened_by_the_prompt_and_one_never_closed():
    assert opens_in_reasoning("<|im_start|>assistant\n<think>\n")
    assert split_reasoning("plan\n</think>\n\nGo.", open_at_start=True) == ("plan\n", "Go.")
    assert split_reasoning("<think>still thinking", open_at_start=False) == ("still thinking", "")


@pytest.mark.parametrize("size", [1, 2, 3, 5, len(ANSWER)])
def test_streamed_in_any_piece_size_gives_the_same_split(size):
    stream = ReasoningStream()
    pieces = []
    for start in range(0, len(ANSWER), size):
        pieces += stream.push(ANSWER[start : start + size])
    pieces += stream.flush()
    assert "".join(p for kind, p in pieces if kind == "reasoning") == "\nThe user wants a city.\n"
    assert "".join(p for kind, p in pieces if kind == "content") == "Paris."
    assert not any("<" in p for _, p in pieces)  # no piece of a tag went out


def test_only_templates_that_mark_reasoning_split():
    assert marks_reasoning("{{ content.split('</think>')[-1] }}") and not marks_reasoning("{{ content }}")
