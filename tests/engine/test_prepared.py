"""A request's prompt is prepared once: its block-key chain is hashed once, its template rendered once
per conversation prefix, and the model's layout read once at start-up (counted, never timed)."""

from __future__ import annotations

from collections import Counter

import pytest

import kvcellar.cache.hashing
import kvcellar.cache.prefix_cache
import kvcellar.engine.engine
import kvcellar.kv.adapter
from kvcellar.config import CacheConfig
from kvcellar.engine import Engine

BLOCK = 16
PROMPT = [(i * 37) % 400 + 20 for i in range(100)]  # 6 full blocks and a 4-token tail
MESSAGES = [{"role": "system", "content": "You answer in one line. " * 4}, {"role": "user", "content": "Why? " * 6}]


@pytest.fixture(scope="module", params=[True, False], ids=["exact", "near"])
def engine(request, tiny_model_dirs):
    loaded = Engine.load(str(tiny_model_dirs["qwen3"]), block_size=BLOCK, num_threads=1,
                         cache=CacheConfig(exact=request.param))  # fmt: skip
    yield loaded
    loaded.close()


class Calls:
    """Wraps `owner.name` to count its calls (and record what `describe` makes of their arguments)."""

    def __init__(self, monkeypatch, owner: object, name: str, describe=lambda *args, **kwargs: None) -> None:
        self.seen: list[object] = []
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            self.seen.append(describe(*args, **kwargs))
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)

    @property
    def count(self) -> int:
        return len(self.seen)


def _hashing_calls(monkeypatch) -> tuple[Calls, Calls, Calls]:
    chains = Calls(monkeypatch, kvcellar.cache.hashing, "hash_blocks")
    core_blocks = Calls(monkeypatch, kvcellar.cache.prefix_cache, "hash_block")
    adapter_blocks = Calls(monkeypatch, kvcellar.kv.adapter, "hash_block")
    return chains, core_blocks, adapter_blocks


def test_the_prompt_chain_is_hashed_once_per_request(engine, monkeypatch):
    chains, core_blocks, adapter_blocks = _hashing_calls(monkeypatch)
    cold = engine.generate(prompt_ids=PROMPT, max_tokens=3)
    warm = engine.generate(prompt_ids=PROMPT, max_tokens=3)
    assert (cold.num_cached_tokens, warm.num_cached_tokens) == (0, len(PROMPT))
    assert chains.count == 2  # one chain per request: lookup, capture and the buffer hand-over share it
    assert core_blocks.count == 0  # captured blocks are stored under the chain's keys, not hashed again
    assert adapter_blocks.count == 0  # 3 tokens complete no block of prompt + answer


def test_generated_blocks_are_hashed_once_each(engine, monkeypatch):
    chains, core_blocks, adapter_blocks = _hashing_calls(monkeypatch)
    result = engine.generate(prompt_ids=[*PROMPT, 7], max_tokens=40, ignore_eos=True)
    assert len(result.token_ids) == 40
    assert (chains.count, core_blocks.count) == (1, 0)
    # 40 tokens sampled, 39 fed back: the sequence reaches 140 tokens, past the block ends 112 and 128.
    # Exact mode stores no generated K/V; near mode hashes each of those two blocks once, extending the chain.
    assert adapter_blocks.count == (2 if engine.prefix_cache.reuse.stores_generated else 0)


def test_a_probe_and_a_request_from_one_prepared_prompt_hash_once(engine, monkeypatch):
    chains, _, _ = _hashing_calls(monkeypatch)
    prepared = engine.prepare(prompt_ids=[*PROMPT, 8, 9])
    engine.probe(prepared=prepared)
    engine.generate(prepared=prepared, max_tokens=2)
    assert chains.count == 1


def test_a_chat_request_renders_each_conversation_prefix_once(engine, monkeypatch):
    tokenizer_class = type(engine.tokenizer)
    renders = Calls(monkeypatch, tokenizer_class, "apply_chat_template",
                    lambda self, conversation, **options: (len(conversation), options["add_generation_prompt"]))
    engine.generate(messages=MESSAGES, max_tokens=2)
    # The prompt (with the generation prompt) once; the system prompt's and the last user message's
    # prefixes once each, to find where their blocks end (engine/prompt.py).
    assert Counter(renders.seen) == {(2, True): 1, (1, False): 1, (2, False): 1}


def test_the_layout_is_read_once_at_start_up(tiny_model_dirs, monkeypatch):
    reads = Calls(monkeypatch, kvcellar.engine.engine, "inspect_layout")
    with Engine.load(str(tiny_model_dirs["qwen3"]), block_size=BLOCK, num_threads=1):
        pass
    assert reads.count == 1
