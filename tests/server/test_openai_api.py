"""The OpenAI endpoints through the official client: shapes, streaming, cached tokens turn by turn."""

from __future__ import annotations

from .support import long_text


def test_models_lists_the_served_model(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [server.model]


def test_chat_completion_whole(server, unique):
    reply = server.client().chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": f"hello {unique}"}], max_tokens=6, temperature=0
    )
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage.completion_tokens <= 6
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens == 0
    assert usage.prompt_tokens_details.model_extra["cached_tokens_by_tier"] == {}


def test_chat_stream_equals_whole_answer(server, unique):
    client = server.client()
    messages = [{"role": "user", "content": long_text(unique, 12)}]
    whole = client.chat.completions.create(model=server.model, messages=messages, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=server.model, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    usage = chunks[-1].usage  # the usage chunk comes last, with no choices
    assert chunks[-1].choices == []
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    # The second run found at least the first run's full blocks (block size 16) in the device tier.
    cached = usage.prompt_tokens_details.cached_tokens
    assert usage.prompt_tokens // 16 * 16 <= cached <= usage.prompt_tokens
    assert usage.prompt_tokens_details.model_extra["cached_tokens_by_tier"] == {"device": cached}


def test_completions_whole_and_streamed(server, unique):
    client = server.client()
    prompt = long_text(unique, 20)
    whole = client.completions.create(model=server.model, prompt=prompt, max_tokens=8, temperature=0)
    assert whole.object == "text_completion"
    streamed = list(client.completions.create(model=server.model, prompt=prompt, max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    assert streamed[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_completion_from_token_ids(server):
    reply = server.client().completions.create(model=server.model, prompt=[5, 6, 7, 8], max_tokens=3, temperature=0)
    assert reply.usage.prompt_tokens == 4


def test_multi_turn_chat_cached_tokens_grow(server, unique):
    client = server.client()
    messages = [{"role": "system", "content": long_text(f"system {unique}", 30)}]
    cached = []
    for turn in range(3):
        messages.append({"role": "user", "content": long_text(f"turn {turn}", 30)})
        if turn < 2:
            reply = client.chat.completions.create(model=server.model, messages=messages, max_tokens=8, temperature=0)
            answer, usage = reply.choices[0].message.content, reply.usage
        else:  # the last turn streamed: the usage chunk carries the same numbers
            chunks = list(client.chat.completions.create(model=server.model, messages=messages, max_tokens=8, temperature=0,
                                                         stream=True, stream_options={"include_usage": True}))  # fmt: skip
            answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            usage = chunks[-1].usage
        cached.append(usage.prompt_tokens_details.cached_tokens)
        assert usage.prompt_tokens_details.model_extra["cached_tokens_by_tier"] == ({"device": cached[-1]} if cached[-1] else {})
        messages.append({"role": "assistant", "content": answer})
    assert cached[0] == 0
    assert 0 < cached[1] < cached[2]
