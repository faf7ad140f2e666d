"""Foundation behaviour of the engine: offline loading, determinism, sampling, bad inputs."""

from __future__ import annotations

import json

import pytest
import torch

from kvcellar import CacheConfig, Engine
from kvcellar.engine.loader import has_only_full_attention
from kvcellar.engine.prefill import chunk_ends, chunk_size_for
from kvcellar.engine.request import GenerationRequest
from kvcellar.errors import InvalidRequestError, ModelLoadError
from kvcellar.kv.layout import inspect_layout

ARCHS = ("qwen3", "gemma3", "qwen3_5")
PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n" * 3


@pytest.fixture(scope="module")
def engines(tiny_model_dirs):
    """One cache-less engine per arch (block 16 so short prompts span several chunks)."""
    loaded = {arch: Engine.load(str(tiny_model_dirs[arch]), block_size=16, cache=CacheConfig(enabled=False)) for arch in ARCHS}
    yield loaded
    for engine in loaded.values():
        engine.close()


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_is_deterministic(engines, arch):
    first = engines[arch].generate(PROMPT, max_tokens=12)
    second = engines[arch].generate(PROMPT, max_tokens=12)
    assert first.token_ids == second.token_ids
    assert len(first.token_ids) == 12 and first.finish_reason == "length"
    assert first.num_prompt_tokens == len(engines[arch].encode(PROMPT)[0])


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_logits_bit_identical_across_runs(engines, arch):
    engine = engines[arch]
    ids, _ = engine.encode(PROMPT)
    runner = engine._worker.runner
    _, logits_a = runner.prefill_prompt(GenerationRequest(engine.prepare(prompt_ids=ids)))
    _, logits_b = runner.prefill_prompt(GenerationRequest(engine.prepare(prompt_ids=ids)))
    assert torch.equal(logits_a, logits_b)


def test_chunks_are_aligned_to_absolute_position_zero():
    assert chunk_ends(0, 40, 16) == [16, 32, 40]
    assert chunk_ends(20, 40, 16) == [32, 40]  # a restore at 20 first completes the block 16..32
    assert chunk_ends(0, 32, 16, extra_cuts=[5, 40]) == [5, 16, 32]
    # Chunks of 64 up to the last whole chunk, then one block at a time.
    assert chunk_ends(0, 150, 16, chunk_size=64) == [64, 128, 144, 150]
    assert chunk_ends(0, 128, 16, chunk_size=64) == [64, 128]
    assert chunk_ends(80, 150, 16, chunk_size=64) == [128, 144, 150]  # a restore inside a chunk completes it
    assert chunk_ends(128, 170, 16, chunk_size=64) == [144, 160, 170]
    # No exact-mode cache (steps_tail False): chunk boundaries only, so a prompt shorter than a chunk is one pass.
    assert chunk_ends(0, 8192, 256, chunk_size=32768, steps_tail=False) == [8192]
    assert chunk_ends(0, 150, 16, chunk_size=64, steps_tail=False) == [64, 128, 150]
    assert chunk_ends(80, 150, 16, extra_cuts=[100], chunk_size=64, steps_tail=False) == [100, 128, 150]
    assert chunk_ends(20, 40, 16, steps_tail=False) == [32, 40]  # one block per pass still ends passes at block ends


def test_prefill_chunk_defaults_to_1024_on_cpu_only_for_full_attention_models(engines):
    # block 16: 1024 is 64 blocks; sliding-window (gemma3) and recurrent (qwen3_5) layers need one chunk per block
    assert {arch: engines[arch].config.prefill_chunk_size for arch in ARCHS} == {"qwen3": 1024, "gemma3": 16, "qwen3_5": 16}


def test_the_default_prefill_pass_per_device_and_mode(engines):
    # No exact-mode cache: long passes where the model allows them, 32K tokens on CUDA (a prompt up to that
    # long prefills in one pass), 1024 on CPU; one block on MPS and in exact mode on the fixed schedule.
    layouts = {arch: inspect_layout(engines[arch].loaded.model.config) for arch in ARCHS}
    assert chunk_size_for(None, 256, layouts["qwen3"], "cuda", exact=False) == 32768
    assert chunk_size_for(None, 256, layouts["qwen3"], "cpu", exact=False) == 1024
    assert chunk_size_for(None, 768, layouts["qwen3"], "cpu", exact=False) == 1536  # whole blocks
    assert chunk_size_for(None, 256, layouts["qwen3"], "mps", exact=False) == 256
    assert chunk_size_for(None, 2048, layouts["qwen3"], "cuda", exact=True) == 2048
    assert chunk_size_for(None, 2048, layouts["gemma3"], "cuda", exact=False) == 2048
    assert chunk_size_for(None, 2048, layouts["qwen3_5"], "cuda", exact=False) == 2048


@pytest.mark.parametrize(("cache", "schedule", "chunk", "resolved"), [
    (CacheConfig(exact=True), "fixed", 16, "fixed"),
    (CacheConfig(exact=True), "auto", 1024, "row-invariant"),
    (CacheConfig(exact=False), "auto", 1024, "fixed"),
])  # fmt: skip
def test_an_exact_cache_prefills_one_block_per_chunk_on_the_fixed_schedule(tiny_model_dirs, cache, schedule, chunk, resolved):
    # On the fixed schedule exact mode reuses only on-schedule state; chunks longer than a block would make a
    # growing chat prefill again what it had prefilled block by block, at each chunk boundary it crosses.
    # The row-invariant schedule (the CPU default for full-attention models) has no such boundaries.
    engine = Engine.load(str(tiny_model_dirs["qwen3"]), block_size=16, cache=cache, prefill_schedule=schedule)
    try:
        assert (engine.config.prefill_chunk_size, engine.config.prefill_schedule) == (chunk, resolved)
        explicit = Engine.load(str(tiny_model_dirs["qwen3"]), block_size=16, cache=cache, prefill_chunk_size=64,
                               prefill_schedule=schedule)  # fmt: skip
        explicit.close()
        assert explicit.config.prefill_chunk_size == 64  # a chunk asked for is kept in either mode
    finally:
        engine.close()


def test_a_longer_prefill_chunk_than_a_model_allows_falls_back_to_one_block(tiny_model_dirs, caplog):
    engine = Engine.load(str(tiny_model_dirs["qwen3_5"]), block_size=16, prefill_chunk_size=64, cache=CacheConfig(enabled=False))
    try:
        assert engine.config.prefill_chunk_size == 16
        assert "prefill chunk of 64 tokens ignored" in caplog.text and "recurrent" in caplog.text
    finally:
        engine.close()
    with pytest.raises(ValueError, match=r"prefill_chunk_size must be a multiple of the block size \(16\), got 40"):
        Engine.load(str(tiny_model_dirs["qwen3"]), block_size=16, prefill_chunk_size=40)


def test_seeded_sampling_reproduces_and_seeds_differ(engines):
    engine = engines["qwen3"]
    options = dict(max_tokens=16, temperature=1.0, top_p=0.95, top_k=50, min_p=0.01)
    a = engine.generate(PROMPT, seed=7, **options)
    b = engine.generate(PROMPT, seed=7, **options)
    c = engine.generate(PROMPT, seed=8, **options)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_stop_string_cuts_output_before_it(engines):
    engine = engines["qwen3"]
    full = engine.generate(PROMPT, max_tokens=24)
    stop = full.text[len(full.text) // 2 :][:3]
    assert stop.strip(), "the greedy text should have printable characters to stop on"
    stopped = engine.generate(PROMPT, max_tokens=24, stop=[stop])
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.index(stop)]


def test_max_tokens_is_honoured(engines):
    result = engines["gemma3"].generate(PROMPT, max_tokens=3)
    assert len(result.token_ids) == 3 and result.finish_reason == "length"


def test_eos_ends_generation(engines):
    engine = engines["qwen3"]
    free_run = engine.generate(PROMPT, max_tokens=6)
    runner = engine._worker.runner
    saved = runner.eos_ids
    eos = free_run.token_ids[2]
    runner.eos_ids = frozenset({eos})  # pretend the third token is the model's eos
    try:
        stopped = engine.generate(PROMPT, max_tokens=6)
        ignored = engine.generate(PROMPT, max_tokens=6, ignore_eos=True)
    finally:
        runner.eos_ids = saved
    assert stopped.token_ids == free_run.token_ids[: free_run.token_ids.index(eos) + 1] and stopped.finish_reason == "stop"
    assert ignored.token_ids == free_run.token_ids


def test_stream_yields_text_then_result(engines):
    events = list(engines["qwen3"].stream(PROMPT, max_tokens=8))
    assert events[-1].result is not None
    assert "".join(e.text for e in events) == events[-1].result.text
    assert events[-1].result.timings.ttft_s > 0


def test_missing_folder_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist.*make-model"):
        Engine.load(str(tmp_path / "nope"))


def test_folder_without_config_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        Engine.load(str(tmp_path))


def test_folder_that_is_not_a_causal_lm(tmp_path, tiny_model_dirs):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    T5ForConditionalGeneration(config).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_model_dirs["qwen3"] / name).read_bytes())
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        Engine.load(str(tmp_path))


def test_folder_without_weights(tmp_path, tiny_model_dirs):
    (tmp_path / "config.json").write_text((tiny_model_dirs["qwen3"] / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="no weights"):
        Engine.load(str(tmp_path))


def test_prompt_longer_than_context(engines, tiny_model_dirs):
    context = json.loads((tiny_model_dirs["qwen3"] / "config.json").read_text())["max_position_embeddings"]
    with pytest.raises(InvalidRequestError, match=f"context is {context} tokens"):
        engines["qwen3"].generate(prompt_ids=[5] * (context + 1), max_tokens=1)


@pytest.mark.parametrize("bad, message", [(dict(max_tokens=0), "max_tokens"), (dict(temperature=-1.0), "temperature"),
                                          (dict(top_p=0.0), "top_p"), (dict(top_k=-1), "top_k")])
def test_invalid_sampling_parameters(engines, bad, message):
    with pytest.raises(InvalidRequestError, match=message):
        engines["qwen3"].generate(PROMPT, **bad)


def test_unknown_arch_error(tmp_path):
    from kvcellar.models import make_model

    with pytest.raises(InvalidRequestError, match="qwen3"):
        make_model("llama9", "tiny", tmp_path / "m")


def test_chat_segments_mark_system_and_last_user(engines):
    engine = engines["qwen3"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    ids, segments = engine.encode(messages=messages)
    system_only = engine.tokenizer.apply_chat_template(messages[:1], tokenize=False)
    assert segments.system_end == len(engine.encode(system_only)[0])
    assert segments.system_end < segments.last_user_end < len(ids)


def test_a_cancelled_queued_request_never_runs(engines):
    engine = engines["qwen3"]
    first = engine.stream(PROMPT, max_tokens=40)
    queued = engine.stream(PROMPT, max_tokens=40)
    queued.cancel()  # from this thread, while the first request holds the worker
    assert [e.result.finish_reason for e in queued if e.result] == ["cancelled"]
    assert list(first)[-1].result.finish_reason == "length"


def test_the_layout_is_read_from_a_folder_without_loading_weights(tiny_model_dirs, tmp_path):
    # The bench resolves the block (which depends on it on CUDA) before any model loads.
    assert {arch: has_only_full_attention(tiny_model_dirs[arch]) for arch in ARCHS} == {
        "qwen3": True, "gemma3": False, "qwen3_5": False}
    assert has_only_full_attention(tmp_path / "model.gguf")  # no config: the engine resolves it after loading
