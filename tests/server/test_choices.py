"""`n` choices: one prefill of the prompt shared by every choice, each choice its own draws; whole and
streamed."""

from __future__ import annotations

from .support import long_text


def test_three_choices_prefill_the_prompt_once(server, unique):
    client = server.client()
    messages = [{"role": "user", "content": long_text(unique, 30)}]
    reply = client.chat.completions.create(model=server.model, messages=messages, n=3, max_tokens=6, temperature=1.0,
                                           seed=7)  # fmt: skip
    assert [choice.index for choice in reply.choices] == [0, 1, 2]
    details = reply.usage.prompt_tokens_details
    assert details.cached_tokens == 0  # a fresh prompt: the first choice computed it...
    assert details.model_extra["prefilled_tokens"] == reply.usage.prompt_tokens  # ...and the others reused it
    assert 3 <= reply.usage.completion_tokens <= 18  # every choice's tokens, at least one each
    texts = [choice.message.content for choice in reply.choices]
    assert len(set(texts)) > 1  # seeds 7, 8, 9: three draws
    again = client.chat.completions.create(model=server.model, messages=messages, n=3, max_tokens=6, temperature=1.0,
                                           seed=7)  # fmt: skip
    assert [choice.message.content for choice in again.choices] == texts  # seeded choices reproduce


def test_streamed_choices_match_the_whole_answer(server, unique):
    client = server.client()
    ask = dict(model=server.model, prompt=long_text(unique, 12), n=2, max_tokens=5, temperature=0.9, seed=3)
    whole = client.completions.create(**ask)
    texts = {0: "", 1: ""}
    finishes = {}
    for chunk in client.completions.create(**ask, stream=True, stream_options={"include_usage": True}):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
        if chunk.usage is not None:
            usage = chunk.usage
    assert texts == {choice.index: choice.text for choice in whole.choices}
    assert set(finishes) == {0, 1}
    assert usage.completion_tokens == whole.usage.completion_tokens
