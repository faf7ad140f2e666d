"""The engine on real weights (SmolLM2-135M-Instruct from its GGUF file): right answers, cold and from the cache.

Random weights cannot show a wrong chat template, a broken stop token or an answer degraded by a
restore; a real instruct model does. Exact mode must give the same tokens and bit-identical
logits with and without the cache; the non-exact mode's restored answers must be the cold ones
(token streams compared, greedy).
"""

from __future__ import annotations

import pytest
import torch

from kvcellar import CacheConfig, Engine
from kvcellar.engine.request import GenerationRequest

BLOCK = 16
QUESTION = "What is the capital of France? Answer in one word."
DOCUMENT = (
    "You answer questions about European geography. Reference notes follow. "
    + " ".join(f"Note {i}: France borders Spain, Italy, Germany and Belgium; its capital is Paris, "
               f"Germany's capital is Berlin and Spain's is Madrid." for i in range(12))  # fmt: skip
)
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def engines(smollm2_gguf, real_home):
    del real_home  # loads reuse the session's conversion
    options = {"block_size": BLOCK}
    # cost_model=False: every hit is restored, so what the tests count does not depend on measured speeds.
    made = {"exact": Engine.load(str(smollm2_gguf), cache=CacheConfig(exact=True, cost_model=False), **options),
            "nonexact": Engine.load(str(smollm2_gguf), cache=CacheConfig(exact=False, cost_model=False), **options),
            "cold": Engine.load(str(smollm2_gguf), cache=CacheConfig(enabled=False), **options)}  # fmt: skip
    yield made
    for engine in made.values():
        engine.close()


def _chat(engine, messages, max_tokens=24):
    return engine.generate(messages=messages, max_tokens=max_tokens, temperature=0)


def test_loads_from_the_file_with_its_name_template_and_stop_token(engines, smollm2_gguf) -> None:
    engine = engines["cold"]
    assert engine.model_name == "SmolLM2-135M-Instruct.Q4_1"
    assert engine.loaded.source == smollm2_gguf
    assert engine.loaded.path.parent.name == "gguf"  # the cached conversion, not a second copy of the file
    assert engine.loaded.tokenizer.convert_ids_to_tokens(sorted(engine.loaded.eos_token_ids)) == ["<|im_end|>"]


def test_cold_answer_is_right_and_stops_at_the_end_of_turn_token(engines) -> None:
    result = _chat(engines["cold"], [{"role": "user", "content": QUESTION}])
    assert result.text == "The capital of France is Paris."
    assert result.finish_reason == "stop"
    assert "<|im_end|>" not in result.text


def test_the_template_adds_its_default_system_prompt_only_without_one(engines) -> None:
    tokenizer = engines["cold"].loaded.tokenizer
    plain = tokenizer.decode(engines["cold"].encode(messages=[{"role": "user", "content": QUESTION}])[0])
    assert plain.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n{QUESTION}")
    own = [{"role": "system", "content": "Answer like a pirate."}, {"role": "user", "content": QUESTION}]
    rendered = tokenizer.decode(engines["cold"].encode(messages=own)[0])
    assert DEFAULT_SYSTEM not in rendered and rendered.startswith("<|im_start|>system\nAnswer like a pirate.<|im_end|>")


@pytest.mark.parametrize("mode", ["exact", "nonexact"])
def test_answers_from_the_cache_are_the_cold_answers(engines, mode) -> None:
    """Same greedy token streams cold, on a hit of the whole prompt, and on the next turn of the chat."""
    engine, cold = engines[mode], engines["cold"]
    messages = [{"role": "system", "content": DOCUMENT}, {"role": "user", "content": QUESTION}]
    first = _chat(engine, messages)
    expected = _chat(cold, messages)
    assert first.token_ids == expected.token_ids and "Paris" in first.text
    again = _chat(engine, messages)
    assert again.num_cached_tokens > 0.9 * again.num_prompt_tokens
    assert again.token_ids == expected.token_ids

    turn = messages + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And of Germany?"}]
    second = _chat(engine, turn)
    assert second.num_cached_tokens >= first.num_prompt_tokens // BLOCK * BLOCK
    assert second.token_ids == _chat(cold, turn).token_ids
    assert "Berlin" in second.text


def test_exact_mode_logits_are_bit_identical_cached_and_uncached(engines) -> None:
    """A prompt sharing the document with a cached one: its restored prefix plus prefilled rest give the cold logits."""
    engine, cold = engines["exact"], engines["cold"]

    def ids_for(question: str) -> list[int]:
        return engine.encode(messages=[{"role": "system", "content": DOCUMENT}, {"role": "user", "content": question}])[0]

    engine.generate(prompt_ids=ids_for("Which is Spain's capital?"), max_tokens=1)  # caches the document's blocks
    ids = ids_for("Which countries border France?")
    with torch.inference_mode():
        restored, cached_logits = engine._worker.runner.prefill_prompt(GenerationRequest(engine.prepare(prompt_ids=ids)))
        _, cold_logits = cold._worker.runner.prefill_prompt(GenerationRequest(cold.prepare(prompt_ids=ids)))
    assert len(ids) // 2 < restored.num_tokens < len(ids)  # the document came from the cache, the question did not
    assert torch.equal(cached_logits, cold_logits)
