"""Continuous batching (engine/scheduler.py): requests run together and each gets exactly its answer alone;
a shared prefix sent at once is prefilled once; cancellation frees K/V; admission keeps to the K/V budget;
a preempted request resumes to the same output."""

from __future__ import annotations

import threading

import pytest

from kvcellar import CacheConfig, Engine
from kvcellar.config import EXACT_DECODE_MAX_ROWS
from kvcellar.engine import attention, batch_decode, runner
from kvcellar.engine.memory import kv_bytes_per_token
from kvcellar.errors import InvalidRequestError

from .support import cancel_during_pass

ARCHS = ("qwen3", "gemma3", "qwen3_5")
BLOCK = 16


def _ids(seed: int, length: int) -> list[int]:
    return [(seed * 131 + i * 37) % 480 + 10 for i in range(length)]


@pytest.fixture(scope="module")
def engines(tiny_model_dirs):
    loaded = {arch: Engine.load(str(tiny_model_dirs[arch]), block_size=BLOCK, cache=CacheConfig(exact=True)) for arch in ARCHS}
    yield loaded
    for engine in loaded.values():
        engine.close()


def _together(engine: Engine, prompts: list[list[int]], **sampling) -> list:
    """Queue every prompt before reading any answer: the scheduler runs them side by side."""
    streams = [engine.stream(prompt_ids=prompt, **sampling) for prompt in prompts]
    return [[event.result for event in stream if event.result is not None][0] for stream in streams]


def _together_held(engine: Engine, prompts: list[list[int]], monkeypatch, **sampling) -> list:
    """`_together`, with the worker held inside the first prompt's first pass until every prompt is queued (an
    event, not a duration): the rest are admitted side by side however slowly this thread queues them."""
    queued = threading.Event()
    run_chunk = runner.run_chunk

    def held(*args):
        queued.wait(timeout=600)  # bounds a hang only
        return run_chunk(*args)

    monkeypatch.setattr(runner, "run_chunk", held)
    streams = [engine.stream(prompt_ids=prompt, **sampling) for prompt in prompts]
    queued.set()
    results = [[event.result for event in stream if event.result is not None][0] for stream in streams]
    monkeypatch.setattr(runner, "run_chunk", run_chunk)
    return results


def _alone(engine: Engine, prompts: list[list[int]], **sampling) -> list[tuple[int, ...]]:
    answers = []
    for prompt in prompts:
        engine.clear_cache()
        answers.append(engine.generate(prompt_ids=prompt, **sampling).token_ids)
    return answers


@pytest.mark.parametrize("arch", ARCHS)
def test_answers_at_concurrency_1_4_and_8_are_bit_identical_to_each_request_alone(engines, arch):
    engine = engines[arch]
    # Distinct prompts of different lengths, half of them sharing a two-block prefix (restored in the batch).
    prompts = [_ids(i, 2 * BLOCK) + _ids(100 + i, 3 + 5 * i) if i % 2 else _ids(200 + i, 9 + 7 * i) for i in range(8)]
    sampling = {"max_tokens": 24, "ignore_eos": True, "temperature": 0}
    alone = _alone(engine, prompts, **sampling)
    before = engine.decode_batches.snapshot()
    for size in (1, 4, 8):
        engine.clear_cache()
        results = []
        for start in range(0, len(prompts), size):
            results += _together(engine, prompts[start : start + size], **sampling)
        assert [result.token_ids for result in results] == alone, f"concurrency {size}"
        assert all(result.finish_reason == "length" for result in results)
    # The full-attention model decoded the requests in shared passes; the others one pass per request.
    buckets, count, total = engine.decode_batches.snapshot()
    batched_rows = total - before[2]
    passes = count - before[1]
    assert engine._worker.scheduler.policy.batch_rows == (arch == "qwen3")
    assert (batched_rows > passes) == (arch == "qwen3")


def test_exact_mode_decodes_more_requests_than_one_pass_takes_in_several_passes_bit_identically(engines, monkeypatch):
    """More requests decoding at once than one exact pass feeds (config.EXACT_DECODE_MAX_ROWS: a pass of more
    rows multiplies through a prefill's kernels and rounds otherwise): each still gets its answer alone.

    The worker is held inside the first prompt's prefill until every request is queued (an event, not a
    duration), so all of them decode together; a spy on the scheduler's decode pass records its sizes."""
    from kvcellar.engine import scheduler

    engine = engines["qwen3"]
    count = EXACT_DECODE_MAX_ROWS + 5
    prompts = [_ids(300 + i, 5 + i) for i in range(count)]
    sampling = {"max_tokens": 6, "ignore_eos": True, "temperature": 0}
    alone = _alone(engine, prompts, **sampling)
    engine.clear_cache()
    sizes: list[int] = []
    decode_rows = scheduler.decode_rows

    def recorded(model, tokens, caches, spans):
        sizes.append(len(tokens))
        return decode_rows(model, tokens, caches, spans)

    monkeypatch.setattr(scheduler, "decode_rows", recorded)
    results = _together_held(engine, prompts, monkeypatch, **sampling)
    assert [result.token_ids for result in results] == alone
    assert max(sizes) == EXACT_DECODE_MAX_ROWS  # the cap was reached, and never passed


def test_requests_sharing_a_prefix_sent_at_once_prefill_it_once(engines):
    engine = engines["qwen3"]
    engine.clear_cache()
    shared = _ids(7, 4 * BLOCK)
    prompts = [shared + _ids(300 + i, 16 + i) for i in range(8)]  # tails of a whole pass (exact mode)
    results = _together(engine, prompts, max_tokens=3, temperature=0)
    assert results[0].num_cached_tokens == 0
    assert [result.num_cached_tokens >= 4 * BLOCK for result in results[1:]] == [True] * 7
    assert all(result.timings.num_prefill_tokens <= len(prompt) - 4 * BLOCK for result, prompt in zip(results[1:], prompts[1:]))


def test_cancelling_mid_decode_and_mid_prefill_frees_the_kv(engines, monkeypatch, wait_for):
    engine = engines["qwen3"]
    decoding = engine.stream(prompt_ids=_ids(11, 3 * BLOCK), max_tokens=400, ignore_eos=True)
    next(decoding)
    # The load is published after each step: wait for one that shows decoded tokens' K/V held.
    load = wait_for(lambda: (report := engine.load_report()).kv_tokens >= 3 * BLOCK + 2 and report,
                    "K/V of decoded tokens", 60)  # fmt: skip
    assert load.running == 1
    decoding.cancel()
    result = [event.result for event in decoding if event.result is not None][0]
    assert result.finish_reason == "cancelled" and len(result.token_ids) < 400
    assert (engine.load_report().kv_tokens, engine.load_report().running) == (0, 0)

    streams: list = []
    cancel_during_pass(monkeypatch, streams)
    length = engine.config.prefill_chunk_size + 2 * BLOCK  # two passes at least: the cancel lands between them
    streams.append(engine.stream(prompt_ids=_ids(12, length), max_tokens=4))
    result = [event.result for event in streams[0] if event.result is not None][0]
    assert result.finish_reason == "cancelled" and 0 < result.timings.num_prefill_tokens < length
    assert (engine.load_report().kv_tokens, engine.load_report().running) == (0, 0)


@pytest.fixture(scope="module")
def tight(tiny_model_dirs):
    """An engine whose K/V budget holds 160 tokens: four 40-token prompts fit, their answers do not."""
    probe = Engine.load(str(tiny_model_dirs["qwen3"]), block_size=BLOCK, cache=CacheConfig(exact=True), kv_budget_bytes=1 << 30)
    per_token = kv_bytes_per_token(probe.loaded)
    probe.close()
    engine = Engine.load(str(tiny_model_dirs["qwen3"]), block_size=BLOCK, cache=CacheConfig(exact=True),
                         kv_budget_bytes=160 * per_token)  # fmt: skip
    yield engine
    engine.close()


def test_admission_keeps_to_the_budget_and_preempted_requests_resume_to_the_same_answer(engines, tight, monkeypatch):
    scheduler = tight._worker.scheduler
    assert scheduler.policy.kv_budget_tokens == 160
    prompts = [_ids(400 + i, 40) for i in range(6)]
    sampling = {"max_tokens": 40, "ignore_eos": True, "temperature": 0}
    alone = _alone(engines["qwen3"], prompts, **sampling)
    held: list[int] = []
    step = scheduler._step

    def checked_step():
        step()
        held.append(scheduler._kv_tokens())

    monkeypatch.setattr(scheduler, "_step", checked_step)
    tight.clear_cache()
    results = _together(tight, prompts, **sampling)
    assert [result.token_ids for result in results] == alone
    assert max(held) <= 160 and max(held) > 120  # full, never over
    assert tight.load_report().preemptions > 0


def test_a_prompt_larger_than_the_whole_budget_is_refused(tight):
    with pytest.raises(InvalidRequestError, match="K/V budget") as error:
        tight.prepare(prompt_ids=_ids(1, 160))
    assert error.value.code == "kv_budget_exceeded"
    assert tight.prepare(prompt_ids=_ids(1, 159)).ids


def test_rows_restored_from_one_prefix_read_its_blocks_from_the_cached_entries_to_the_same_answers(tiny_model_dirs,
                                                                                                  monkeypatch):  # fmt: skip
    """Requests restored from the same blocks decode together reading those blocks' entries, not each its copy."""
    engine = Engine.load(str(tiny_model_dirs["qwen3"]), block_size=256, cache=CacheConfig(exact=True))
    try:
        kernel, chunk = attention._ragged_kernel, attention.shared_chunk_keys()
        if kernel is None:
            pytest.skip("no AVX-512: batched decode steps run torch's attention row by row, which reads each row's own K/V")
        assert chunk == 256
        shared = _ids(21, 2 * chunk)
        prompts = [shared + _ids(500 + i, 16 + i) for i in range(4)]  # tails of a whole pass (exact mode)
        sampling = {"max_tokens": 6, "ignore_eos": True, "temperature": 0}
        alone = _alone(engine, prompts, **sampling)
        calls: list[tuple[int, list[int]]] = []

        def spy(rows, keys, values, lengths, shared_keys, shared_values, shared_at, scale):
            calls.append((len(keys), list(shared_at)))
            return kernel(rows, keys, values, lengths, shared_keys, shared_values, shared_at, scale)

        monkeypatch.setattr(attention, "_ragged_kernel", spy)
        engine.clear_cache()
        engine.generate(prompt_ids=shared + _ids(99, 16), max_tokens=1)  # the prefix's two blocks now sit in memory
        results = _together_held(engine, prompts, monkeypatch, **sampling)
        assert [result.token_ids for result in results] == alone
        assert [result.num_cached_tokens for result in results] == [2 * chunk] * 4
        # Every layer of a step of all four rows reads both blocks from the entries, from their first key, for
        # rows 1-3; row 0 adopted the warm-up request's buffers, which still held the prefix: nothing was copied.
        four = [at for rows, at in calls if rows == 4]
        assert four and all(at == [value for row in (1, 2, 3) for c in (0, 1) for value in (row, c, 0)] for at in four)
    finally:
        engine.close()


def test_batched_steps_write_their_kv_alike_with_the_built_kernel_and_without_it(engines, monkeypatch):
    """The one-call K/V writer (engine/kernels/append_rows.cpp) and torch's per-row copies give the same answers."""
    engine = engines["qwen3"]
    prompts = [_ids(600 + i, 20 + 3 * i) for i in range(4)]
    sampling = {"max_tokens": 8, "ignore_eos": True, "temperature": 0}
    alone = _alone(engine, prompts, **sampling)
    engine.clear_cache()
    with_kernel = [result.token_ids for result in _together_held(engine, prompts, monkeypatch, **sampling)]
    monkeypatch.setattr(batch_decode, "_append_rows", None)
    engine.clear_cache()
    without = [result.token_ids for result in _together_held(engine, prompts, monkeypatch, **sampling)]
    assert with_kernel == without == alone


def test_short_prompts_queued_together_share_one_prefill_pass_and_answer_as_alone(engines, monkeypatch):
    """Questions under a cached prefix prefill their last passes in one forward (engine/batch_prefill.py), each
    bit-identical to its pass alone; a prompt that shares a block still in flight waits and finds it cached."""
    engine = engines["qwen3"]
    assert engine._worker.scheduler.policy.batch_prefill_rows == 16  # exact mode, the row-invariant schedule
    shared = _ids(31, 4 * BLOCK)
    prompts = [shared + _ids(700 + i, 16 + 2 * i) for i in range(6)]
    sampling = {"max_tokens": 5, "ignore_eos": True, "temperature": 0, "logprobs": 2}
    alone = [engine.generate(prompt_ids=prompt, **sampling) for prompt in prompts if not engine.clear_cache()]
    groups: list[int] = []
    run_last_passes = runner.RequestRunner.run_last_passes

    def spy(self, prompts):
        groups.append(len(prompts))
        return run_last_passes(self, prompts)

    monkeypatch.setattr(runner.RequestRunner, "run_last_passes", spy)
    engine.clear_cache()
    engine.generate(prompt_ids=shared + _ids(99, 16), max_tokens=1)  # the prefix is cached
    results = _together_held(engine, prompts, monkeypatch, **sampling)
    assert groups and max(groups) > 1
    assert [result.token_ids for result in results] == [result.token_ids for result in alone]
    assert all(result.logprobs for result in alone)
    assert [result.logprobs for result in results] == [result.logprobs for result in alone]
    assert [result.num_cached_tokens for result in results] == [4 * BLOCK] * 6
