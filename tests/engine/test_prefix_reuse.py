"""The prefix cache inside the engine: a hit must not change the answer.

Exact mode: logits bit-identical and greedy tokens equal to a cold run, over
property-based conversations (multi-turn, edited earlier message, regenerate,
truncated prompt) on all three layer kinds. Non-exact mode: close within a
stated tolerance, same greedy first token.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcellar import CacheConfig, ChatSession, Engine
from kvcellar.engine.request import GenerationRequest

ARCHS = ("qwen3", "gemma3", "qwen3_5")
BLOCK = 16
# qwen3 (full attention only) also in prefill chunks of 4 blocks: whole chunks, then stepped blocks.
CHUNKED = "qwen3-chunked"
CHUNK = 64
WORDS = ["cache", "prefix", "token", "block", "layer", "window", "state", "the", "a", "of", "model", "hit", "miss", "disk"]
# Non-exact mode reuses state computed with other chunk boundaries: float32 rounding differs at ~1e-6.
NON_EXACT_ATOL = 1e-4


def _pair(model_dir, exact=True, dtype="auto", chunk=BLOCK, schedule="auto"):
    options = {"block_size": BLOCK, "dtype": dtype, "prefill_chunk_size": chunk, "prefill_schedule": schedule}
    warm = Engine.load(str(model_dir), cache=CacheConfig(exact=exact), **options)
    cold = Engine.load(str(model_dir), cache=CacheConfig(enabled=False), **options)
    return warm, cold


@pytest.fixture(scope="module")
def exact_pairs(tiny_model_dirs):
    pairs = {arch: _pair(tiny_model_dirs[arch]) for arch in ARCHS}
    pairs[CHUNKED] = _pair(tiny_model_dirs["qwen3"], chunk=CHUNK, schedule="fixed")  # stepped keys: the fixed schedule
    yield pairs
    for warm, cold in pairs.values():
        warm.close()
        cold.close()


def _logits(engine, ids):
    """Prefill `ids` as a request would, keeping its K/V buffers for the next one (adopted in place if it shares them)."""
    runner = engine._worker.runner
    with torch.inference_mode():  # as in a request: the pooled buffers are inference tensors
        request = GenerationRequest(engine.prepare(prompt_ids=ids))
        restored, logits = runner.prefill_prompt(request)
        runner.keep_buffers(restored.cache, request.prompt.block_keys)
    return restored, logits


def _sentence(seed: int, length: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(length))


operation = st.one_of(
    st.tuples(st.just("turn"), st.integers(0, 50), st.integers(3, 30)),
    st.tuples(st.just("edit"), st.integers(0, 50), st.integers(3, 30)),
    st.tuples(st.just("regenerate"), st.just(0), st.just(0)),
    st.tuples(st.just("truncate"), st.integers(1, 99), st.just(0)),
)


@pytest.mark.parametrize("arch", (*ARCHS, CHUNKED))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=st.lists(operation, min_size=2, max_size=5))
def test_exact_mode_matches_cold_bit_for_bit(exact_pairs, arch, operations):
    warm, cold = exact_pairs[arch]
    messages = [{"role": "system", "content": "You answer questions about " + _sentence(1, 12)}]
    last_ids: list[int] = []
    for kind, seed, length in operations:
        if kind == "turn" or (kind == "edit" and len(messages) < 2):
            messages.append({"role": "user", "content": _sentence(seed, length)})
        elif kind == "edit":  # branch: rewrite the first user message, forget what followed
            messages = messages[:1] + [{"role": "user", "content": _sentence(seed, length)}]
        elif kind == "regenerate" and last_ids:
            pass  # same prompt again
        elif kind == "truncate" and last_ids:
            last_ids = last_ids[: max(1, len(last_ids) * seed // 100)]
        if kind != "truncate" or not last_ids:
            if messages[-1]["role"] != "user":
                messages.append({"role": "user", "content": _sentence(seed, 5)})
            last_ids, _ = warm.encode(messages=messages)
        # The prefill adopts in place whatever blocks it shares with the request before (the last op's
        # generate); the rest is restored by copy or computed. generate then runs on the prefill's buffers.
        (_, warm_logits), (_, cold_logits) = _logits(warm, last_ids), _logits(cold, last_ids)
        assert torch.equal(warm_logits, cold_logits), f"{arch}: logits differ after {kind}"
        warm_out = warm.generate(prompt_ids=last_ids, max_tokens=4)
        cold_out = cold.generate(prompt_ids=last_ids, max_tokens=4)
        assert warm_out.token_ids == cold_out.token_ids
        if kind == "turn":
            answer = "<think>" + _sentence(seed + 1, 4) + "</think>" + warm_out.text
            messages.append({"role": "assistant", "content": answer})


@pytest.mark.parametrize("arch", (*ARCHS, CHUNKED))
@pytest.mark.parametrize("aligned", [False, True], ids=["with-tail", "block-aligned"])
def test_exact_repeat_restores_everything_and_uses_saved_logits(exact_pairs, arch, aligned):
    warm, cold = exact_pairs[arch]
    ids = warm.encode(_sentence(3 + aligned, 40))[0]
    if aligned:  # the logits then live in a 0-token entry after the last block
        ids = ids[: len(ids) // BLOCK * BLOCK]
    first = warm.generate(prompt_ids=ids, max_tokens=5)
    repeats = [warm.generate(prompt_ids=ids, max_tokens=5) for _ in range(3)]  # the cost model learns rates meanwhile
    again = repeats[-1]
    assert first.num_cached_tokens == 0 or first.num_cached_tokens < len(ids)
    assert [r.num_cached_tokens for r in repeats] == [len(ids)] * 3  # the tail entry carries the next-token logits
    assert again.timings.num_prefill_tokens == 0
    assert again.token_ids == first.token_ids == cold.generate(prompt_ids=ids, max_tokens=5).token_ids


def test_multi_turn_exact_reuses_whole_blocks(exact_pairs):
    warm, _ = exact_pairs["qwen3"]
    session = ChatSession(warm, system="You are terse. " + _sentence(5, 20))
    cached = [session.chat(_sentence(seed, 12), max_tokens=6).num_cached_tokens for seed in range(3)]
    prompts = [r.num_prompt_tokens for r in session.results]
    assert cached[1] == (prompts[0] // BLOCK) * BLOCK  # exact mode restores the previous prompt's full blocks
    assert cached[2] >= (prompts[1] // BLOCK) * BLOCK > cached[1]


def test_chunked_prefill_reuses_stepped_blocks_only_within_the_same_chunk_span(exact_pairs):
    # Chunks of 64 tokens (4 blocks) up to the prompt's last whole chunk, then one block at a time.
    warm, cold = exact_pairs[CHUNKED]
    warm.clear_cache()  # other tests' prompts share these words
    ids = warm.encode(_sentence(13, 120))[0]
    assert len(ids) >= 150
    expected = [
        (100, 0),  # cold: [0, 64) in one chunk, then stepped blocks [64, 80) and [80, 96)
        (120, 96),  # same last whole chunk (64): its stepped blocks are what a cold run computes
        (140, 64),  # a whole chunk now ends at 128: [64, 128) is one chunk, the stepped blocks do not fit
        (150, 128),  # the previous request stored [64, 128) as computed in a whole chunk
    ]
    for length, cached in expected:
        restored, warm_logits = _logits(warm, ids[:length])
        assert restored.num_tokens == cached, f"prompt of {length} tokens"
        assert torch.equal(warm_logits, _logits(cold, ids[:length])[1])


def test_recurrent_model_falls_back_to_block_boundary_and_stays_exact(tiny_model_dirs):
    warm, cold = _pair(tiny_model_dirs["qwen3_5"], exact=False)
    try:
        ids = warm.encode(_sentence(9, 30))[0]
        warm.generate(prompt_ids=ids, max_tokens=1)
        diverged = ids[: 2 * BLOCK + 5] + [(ids[2 * BLOCK + 5] + 1) % 1000] + ids[2 * BLOCK + 6 :]
        restored, warm_logits = _logits(warm, diverged)
        assert restored.num_tokens == 2 * BLOCK  # cannot trim a recurrent state: back to the checkpoint
        assert torch.equal(warm_logits, _logits(cold, diverged)[1])
    finally:
        warm.close()
        cold.close()


def test_sliding_window_restores_after_the_window_wrapped(exact_pairs, tiny_model_dirs):
    import json

    window = json.loads((tiny_model_dirs["gemma3"] / "config.json").read_text())["sliding_window"]
    warm, cold = exact_pairs["gemma3"]
    ids = warm.encode(_sentence(11, 60))[0]
    assert len(ids) > 3 * window
    warm.generate(prompt_ids=ids, max_tokens=1)
    extended = ids + warm.encode(" " + _sentence(12, 10))[0]
    restored, warm_logits = _logits(warm, extended)
    assert restored.num_tokens == len(ids) // BLOCK * BLOCK > window
    assert torch.equal(warm_logits, _logits(cold, extended)[1])
    assert warm.generate(prompt_ids=extended, max_tokens=6).token_ids == cold.generate(prompt_ids=extended, max_tokens=6).token_ids


@pytest.mark.parametrize("arch", ARCHS)
def test_non_exact_mode_is_close_and_keeps_greedy_first_token(tiny_fp32_dirs, arch):
    warm, cold = _pair(tiny_fp32_dirs[arch], exact=False, dtype="float32")
    try:
        session = ChatSession(warm, system="System: " + _sentence(2, 15))
        for seed in range(3):
            session.chat(_sentence(seed, 10), max_tokens=5)
            follow_up = session.messages + [{"role": "user", "content": _sentence(seed + 20, 6)}]
            ids, segments = warm.encode(messages=follow_up)
            restored, warm_logits = warm._worker.runner.prefill_prompt(GenerationRequest(warm.prepare(prompt_ids=ids, segments=segments)))
            _, cold_logits = _logits(cold, ids)
            assert restored.num_tokens > 0
            torch.testing.assert_close(warm_logits, cold_logits, atol=NON_EXACT_ATOL, rtol=0)
            assert int(warm_logits.argmax()) == int(cold_logits.argmax())
    finally:
        warm.close()
        cold.close()


def test_non_exact_reuses_up_to_the_previous_prompt_end(tiny_fp32_dirs):
    warm, cold = _pair(tiny_fp32_dirs["qwen3"], exact=False, dtype="float32")
    try:
        session = ChatSession(warm, system="System: " + _sentence(4, 15))
        first = session.chat(_sentence(1, 10), max_tokens=5)
        second = session.chat(_sentence(2, 10), max_tokens=5)
        assert second.num_cached_tokens >= first.num_prompt_tokens
    finally:
        warm.close()
        cold.close()


def test_near_mode_prefills_a_prompt_shorter_than_the_chunk_in_one_pass_and_restores_its_blocks(tiny_fp32_dirs):
    # Capture is independent of the pass: the blocks a later prompt restores are sliced out of one long pass
    # (no block steps after the last whole chunk: a 150-token prompt with chunk 256 is one forward).
    warm, cold = _pair(tiny_fp32_dirs["qwen3"], exact=False, dtype="float32", chunk=256)
    passes: list[int] = []
    hook = warm.loaded.model.register_forward_pre_hook(lambda _m, _a, kw: passes.append(kw["input_ids"].shape[1]),
                                                        with_kwargs=True)  # fmt: skip
    try:
        ids = warm.encode(_sentence(9, 100))[0][:150]
        assert len(ids) == 150
        _logits(warm, ids)
        assert passes == [150]
        passes.clear()
        follow = ids[:100] + warm.encode(_sentence(11, 20))[0][:40]
        restored, warm_logits = _logits(warm, follow)
        assert restored.num_tokens == 100  # the shared tokens (near mode trims the block they diverge in)
        assert passes == [len(follow) - 100]
        _, cold_logits = _logits(cold, follow)
        torch.testing.assert_close(warm_logits, cold_logits, atol=NON_EXACT_ATOL, rtol=0)
        # Every block boundary of the one pass is a restore point: prompts that leave it there restore
        # exactly its blocks, and continue as a cold run would.
        for boundary in range(BLOCK, 150, BLOCK):
            other = next(token for token in range(5, 50) if token != ids[boundary])
            follow = ids[:boundary] + [other] * 7
            restored, warm_logits = _logits(warm, follow)
            assert restored.num_tokens == boundary
            _, cold_logits = _logits(cold, follow)
            torch.testing.assert_close(warm_logits, cold_logits, atol=NON_EXACT_ATOL, rtol=0)
    finally:
        hook.remove()
        warm.close()
        cold.close()


def test_generated_blocks_keep_their_true_parents_when_a_store_is_refused(tiny_fp32_dirs):
    from kvcellar.cache import hash_block, hash_blocks

    engine = Engine.load(str(tiny_fp32_dirs["qwen3"]), block_size=BLOCK, dtype="float32", cache=CacheConfig(exact=False))
    try:
        core = engine.cache_registry.core_for_salt("")
        calls: list[tuple[bytes, tuple[int, ...]]] = []
        store = core.insert_block

        def refuse_first_generated(parent, token_ids, *args, **kwargs):
            calls.append((parent, tuple(token_ids)))
            return None if len(calls) == 1 else store(parent, token_ids, *args, **kwargs)

        ids = engine.encode(_sentence(6, 20))[0][: 2 * BLOCK]  # block-aligned: generated tokens fill new blocks
        prompt_hook = engine.prefix_cache.capture_prompt_hook
        core.insert_block = refuse_first_generated
        engine.prefix_cache.capture_prompt_hook = lambda *a, **k: None  # record only the generated blocks
        result = engine.generate(prompt_ids=ids, max_tokens=2 * BLOCK + 2, ignore_eos=True)
        engine.prefix_cache.capture_prompt_hook = prompt_hook
        assert len(calls) >= 2
        sequence = list(ids) + list(result.token_ids)
        chain = hash_blocks(core.root, sequence, BLOCK)
        assert calls[1][0] == chain[len(ids) // BLOCK] == hash_block(calls[0][0], calls[0][1])
    finally:
        engine.close()
