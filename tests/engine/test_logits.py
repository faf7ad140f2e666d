"""Logit bias, penalties, stop token ids and log-probabilities (engine/logits.py, engine/sampling.py):
exact score arithmetic on fake logits, then through a tiny model's engine."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kvcellar import Engine
from kvcellar.engine.logits import ScoreShaper, token_logprobs
from kvcellar.engine.sampling import Sampler, SamplingParams
from kvcellar.errors import InvalidRequestError

LOGITS = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0])


def test_repetition_penalty_divides_positive_and_multiplies_negative_scores_of_seen_tokens():
    shaper = ScoreShaper(SamplingParams(repetition_penalty=2.0), prompt_ids=[0, 1])
    assert shaper.shape(LOGITS).tolist() == [1.0, -2.0, 0.5, 3.0, -2.0]
    shaper.generated(3)
    assert shaper.shape(LOGITS).tolist() == [1.0, -2.0, 0.5, 1.5, -2.0]


def test_frequency_and_presence_penalties_count_generated_tokens_only():
    shaper = ScoreShaper(SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), prompt_ids=[2])
    for token in (3, 3, 0):
        shaper.generated(token)
    # token 3: twice (2 * 0.5 + 0.25), token 0: once (0.5 + 0.25), the prompt's token 2: untouched
    assert shaper.shape(LOGITS).tolist() == [1.25, -1.0, 0.5, 1.75, -2.0]


def test_logit_bias_adds_to_the_named_scores_and_keys_may_be_strings():
    params = SamplingParams(logit_bias={"4": 10.0, 1: -5.0})
    assert params.logit_bias == ((1, -5.0), (4, 10.0))
    assert ScoreShaper(params, ()).shape(LOGITS).tolist() == [2.0, -6.0, 0.5, 3.0, 8.0]
    assert Sampler(params).sample(LOGITS) == 4  # greedy picks the top of the shaped scores


def test_greedy_penalty_steers_away_from_a_repeated_token():
    sampler = Sampler(SamplingParams(frequency_penalty=2.0))
    assert [sampler.sample(LOGITS) for _ in range(2)] == [3, 0]  # 3.0 - 2 = 1.0 < 2.0


@pytest.mark.parametrize("field, value", [("presence_penalty", 2.5), ("frequency_penalty", -3), ("repetition_penalty", 0),
                                          ("logit_bias", {"x": 1}), ("logit_bias", {5: 101}), ("stop_token_ids", [-1]),
                                          ("logprobs", 21), ("logprobs", -1)])  # fmt: skip
def test_out_of_range_shaping_is_refused_naming_the_field(field, value):
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**{field: value})


def test_token_logprobs_are_the_raw_log_softmax_with_the_best_alternatives():
    entry = token_logprobs(LOGITS, 2, top=2)
    expected = torch.log_softmax(LOGITS, dim=-1)
    assert entry.token_id == 2 and entry.logprob == pytest.approx(float(expected[2]))
    assert [token for token, _ in entry.top] == [3, 0]
    assert entry.top[0][1] == pytest.approx(float(expected[3]))
    assert math.exp(entry.top[0][1]) > math.exp(entry.top[1][1])


@pytest.fixture(scope="module")
def engine(tiny_model_dirs):
    with Engine.load(str(tiny_model_dirs["qwen3"]), block_size=16) as loaded:
        yield loaded


PROMPT = [(i * 37) % 400 + 20 for i in range(40)]


def test_logprobs_of_the_first_token_match_a_direct_forward(engine):
    result = engine.generate(prompt_ids=PROMPT, max_tokens=4, logprobs=3, ignore_eos=True)
    assert len(result.logprobs) == 4 and all(len(entry.top) == 3 for entry in result.logprobs)
    with torch.inference_mode():
        logits = engine.loaded.model(input_ids=torch.tensor([PROMPT])).logits[0, -1].float()
    expected = torch.log_softmax(logits, dim=-1)
    first = result.logprobs[0]
    assert first.token_id == result.token_ids[0] == int(expected.argmax())  # greedy: the top alternative
    assert first.top[0][0] == first.token_id
    assert first.logprob == pytest.approx(float(expected[first.token_id]), abs=0.05)  # bf16 rounding of the passes
    for (token, logprob) in first.top:
        assert logprob == pytest.approx(float(expected[token]), abs=0.05)


def test_a_banned_token_never_comes_and_a_stop_token_id_ends_the_answer(engine):
    engine.clear_cache()
    free = engine.generate(prompt_ids=PROMPT, max_tokens=6, ignore_eos=True)
    banned = free.token_ids[0]
    steered = engine.generate(prompt_ids=PROMPT, max_tokens=6, ignore_eos=True, logit_bias={banned: -100.0})
    assert banned not in steered.token_ids
    stopped = engine.generate(prompt_ids=PROMPT, max_tokens=6, ignore_eos=True, stop_token_ids=[free.token_ids[2]])
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[:3]
    assert stopped.logprobs is None


def test_a_logit_bias_id_outside_the_vocabulary_is_refused_before_queueing(engine):
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        engine.stream(prompt_ids=PROMPT, logit_bias={10**9: 1.0})


def test_a_grammar_makes_a_random_weight_model_answer_in_the_schema(engine):
    grammar = '''start: %json {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999}, "ok": {"type": "boolean"}},
    "required": ["n", "ok"], "additionalProperties": false, "x-guidance": {"whitespace_flexible": false}}'''
    result = engine.generate(prompt_ids=PROMPT, max_tokens=100, grammar=grammar, logprobs=0)
    answer = json.loads(result.text)
    assert set(answer) == {"n", "ok"} and isinstance(answer["n"], int) and isinstance(answer["ok"], bool)
    assert result.finish_reason == "stop"
    free = engine.generate(prompt_ids=PROMPT, max_tokens=8, ignore_eos=True)
    assert not free.text.startswith("{")  # the model alone writes no JSON: the grammar did the work


def test_a_grammar_the_engine_cannot_compile_is_refused_before_queueing(engine):
    with pytest.raises(InvalidRequestError, match="grammar engine"):
        engine.stream(prompt_ids=PROMPT, grammar='start: %json {"type": "no-such-type"}')


def test_the_library_shows_tools_and_a_grammar_forces_a_call(engine):
    from kvcellar.chat.grammar import tool_call_grammar
    from kvcellar.chat.tool_calls import split_tool_calls
    from kvcellar.chat.tools import parse_tools

    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "JST"]}}, "required": ["zone"],
        "additionalProperties": False}}}]  # fmt: skip
    messages = [{"role": "user", "content": "What time is it?"}]
    shown = engine.prepare(messages=messages, tools=tools)
    assert len(shown.ids) > len(engine.prepare(messages=messages).ids)  # the tools are in the prompt
    result = engine.generate(messages=messages, tools=tools, max_tokens=40,
                             grammar=tool_call_grammar(parse_tools(tools), None, parallel=False))  # fmt: skip
    _, calls = split_tool_calls(result.text)
    assert [(call.name, json.loads(call.arguments)["zone"] in ("UTC", "JST")) for call in calls] == [("get_time", True)]
    with pytest.raises(ValueError, match="messages"):
        engine.prepare("plain text", tools=tools)
