"""Log-probabilities, penalties and logit bias through the official `openai` client: shapes, streamed
against whole, and the sampling fields' effect on the served answer."""

from __future__ import annotations

import math

import pytest

from .support import long_text


def test_chat_logprobs_whole_and_streamed_agree(server, unique):
    client = server.client()
    messages = [{"role": "user", "content": long_text(unique, 10)}]
    ask = dict(model=server.model, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3,
               extra_body={"ignore_eos": True})  # fmt: skip
    whole = client.chat.completions.create(**ask)
    content = whole.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
        assert entry.logprob == entry.top_logprobs[0].logprob  # greedy: the chosen token is the most likely
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    assert sum(math.exp(top.logprob) for top in content[0].top_logprobs) <= 1.0 + 1e-6
    streamed = [chunk.choices[0].logprobs.content[0] for chunk in client.chat.completions.create(**ask, stream=True)
                if chunk.choices and chunk.choices[0].logprobs]  # fmt: skip
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]


def test_completion_logprobs_have_openais_parallel_lists(server, unique):
    reply = server.client().completions.create(model=server.model, prompt=long_text(unique, 8), max_tokens=4,
                                               temperature=0, logprobs=2, extra_body={"ignore_eos": True})  # fmt: skip
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert all(len(alternatives) <= 2 for alternatives in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0
    assert logprobs.text_offset[1] == len(logprobs.tokens[0])
    assert "".join(logprobs.tokens) == reply.choices[0].text


def test_logit_bias_bans_the_greedy_first_token(server, unique):
    """The first token, named by its text in the log-probabilities (each token decoded alone); every id that
    decodes to that text is banned (re-encoding the answer's text need not give back the ids generated)."""
    client = server.client()
    ask = dict(model=server.model, prompt=long_text(unique, 8), max_tokens=4, temperature=0, logprobs=0,
               extra_body={"ignore_eos": True})  # fmt: skip
    first = client.completions.create(**ask).choices[0].logprobs.tokens[0]
    tokenizer = server.tokenizer()
    same_text = [i for i in range(len(tokenizer)) if tokenizer.decode([i]) == first]
    assert same_text
    banned = client.completions.create(**ask, logit_bias={str(i): -100 for i in same_text}).choices[0]
    assert banned.logprobs.tokens[0] != first


def test_frequency_penalty_picks_the_top_of_the_penalized_scores(server):
    """Each greedy pick is the best raw log-probability minus 2.0 per earlier use of that token (the reported
    log-probabilities are the model's raw ones), and the penalty changes at least one pick here."""
    reply = server.client().completions.create(model=server.model, prompt="hello", max_tokens=10,
                                               temperature=0, logprobs=20, frequency_penalty=2.0,
                                               extra_body={"ignore_eos": True})  # fmt: skip
    logprobs = reply.choices[0].logprobs
    counts: dict[str, int] = {}
    steered = 0
    for token, alternatives in zip(logprobs.tokens, logprobs.top_logprobs):
        if len(alternatives) == 20:  # every candidate's text is distinct (a shared text would merge two entries)
            shaped = {text: logprob - 2.0 * counts.get(text, 0) for text, logprob in alternatives.items()}
            assert max(shaped, key=shaped.get) == token
            steered += token != max(alternatives, key=alternatives.get)
        counts[token] = counts.get(token, 0) + 1
    assert steered >= 1


def test_served_logprobs_match_a_direct_forward(server):
    """The first token's log-probabilities, through the client, against the model folder run directly here."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = [(i * 53) % 400 + 30 for i in range(24)]
    reply = server.client().completions.create(model=server.model, prompt=ids, max_tokens=1, temperature=0, logprobs=5)
    served = reply.choices[0].logprobs.top_logprobs[0]
    model = AutoModelForCausalLM.from_pretrained(server.model_dir, dtype=torch.bfloat16)
    with torch.inference_mode():
        expected = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), dim=-1)
    tokenizer = server.tokenizer()
    nearby = {tokenizer.decode([token]): float(expected[token]) for token in torch.topk(expected, 20).indices.tolist()}
    assert len(served) == 5
    for text, logprob in served.items():  # each of the served five is among the model's best, at its value
        assert logprob == pytest.approx(nearby[text], abs=0.05)  # within bf16 rounding of the two paths
    assert max(served.values()) == pytest.approx(float(expected.max()), abs=0.05)
