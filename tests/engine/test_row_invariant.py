"""The row-invariant prefill schedule (engine/prefill.py, engine/schedule.py, engine/invariance.py).

On a CPU in exact mode, a full-attention model prefills in long passes and still restores at every
block boundary bit for bit; sliding-window and recurrent models keep the fixed schedule; where the
load-time check finds rows rounding differently by pass length, the engine falls back with a warning.
"""

from __future__ import annotations

import logging
import random

import pytest
import torch

from kvcellar import Engine
from kvcellar.config import ROW_INVARIANT_MIN_ROWS, CacheConfig
from kvcellar.engine import invariance, schedule
from kvcellar.engine.invariance import RowCheck, check_row_invariance
from kvcellar.engine.prefill import invariant_chunk_ends
from kvcellar.engine.request import GenerationRequest

BLOCK = 16
ARCHS = ("qwen3", "gemma3", "qwen3_5")


def _ids(seed: int, count: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 500) for _ in range(count)]


def _logits(engine: Engine, ids: list[int]) -> tuple[torch.Tensor, int]:
    """The prompt's next-token logits through restore + prefill, and how many tokens were restored."""
    runner = engine._worker.runner
    with torch.inference_mode():
        restored, logits = runner.prefill_prompt(GenerationRequest(engine.prepare(prompt_ids=ids)))
        runner.keep_buffers(restored.cache, ())
    return logits, restored.num_tokens


@pytest.fixture(scope="module")
def engines(tiny_fp32_dirs):
    warm = {arch: Engine.load(str(tiny_fp32_dirs[arch]), block_size=BLOCK, prefill_chunk_size=4 * BLOCK if arch == "qwen3"
                              else None, cache=CacheConfig(exact=True, cost_model=False)) for arch in ARCHS}  # fmt: skip
    cold = {arch: Engine.load(str(tiny_fp32_dirs[arch]), block_size=BLOCK, prefill_chunk_size=4 * BLOCK if arch == "qwen3"
                              else None, cache=CacheConfig(enabled=False)) for arch in ARCHS}  # fmt: skip
    yield warm, cold
    for engine in (*warm.values(), *cold.values()):
        engine.close()


def test_full_attention_on_cpu_takes_the_row_invariant_schedule(engines):
    warm, cold = engines
    assert warm["qwen3"].config.prefill_schedule == "row-invariant"
    assert cold["qwen3"].config.prefill_schedule == "row-invariant"  # the reference an exact cache is held to
    assert warm["qwen3"]._worker.runner.min_rows == ROW_INVARIANT_MIN_ROWS
    for arch in ("gemma3", "qwen3_5"):  # a sliding window or a recurrent state: one block per pass
        assert warm[arch].config.prefill_schedule == "fixed"
        assert warm[arch].config.prefill_chunk_size == BLOCK


@pytest.mark.parametrize("arch", ARCHS)
def test_restores_at_every_block_boundary_are_bit_identical_to_no_cache(engines, arch):
    """A cold prompt of 5 blocks + 3 (one pass on the row-invariant schedule), then prompts that end 1 to
    BLOCK + 3 tokens past each boundary: each restores the most it may and matches the uncached logits."""
    warm, cold = engines
    base = _ids(1, 5 * BLOCK + 3)
    _logits(warm[arch], base)
    restored_counts = set()
    for boundary in range(BLOCK, 5 * BLOCK + 1, BLOCK):
        for extra in (1, 2, ROW_INVARIANT_MIN_ROWS - 1, ROW_INVARIANT_MIN_ROWS, BLOCK + 3):
            prompt = base[:boundary] + _ids(boundary * 100 + extra, extra)
            warm_logits, restored = _logits(warm[arch], prompt)
            cold_logits, _ = _logits(cold[arch], prompt)
            assert torch.equal(warm_logits, cold_logits), (boundary, extra)
            restored_counts.add(restored)
            if warm[arch].config.prefill_schedule == "row-invariant":
                # the deepest boundary that leaves at least min_rows tokens to compute
                assert restored == max(0, (len(prompt) - ROW_INVARIANT_MIN_ROWS) // BLOCK * BLOCK)
    assert max(restored_counts) == 5 * BLOCK


def test_greedy_tokens_after_a_one_pass_prefill_match_no_cache(engines):
    warm, cold = engines
    prompt = _ids(7, 9 * BLOCK + 5)  # longer than the prefill chunk: two passes cold
    first = warm["qwen3"].generate(prompt_ids=prompt, max_tokens=6)
    turn = prompt + list(first.token_ids) + _ids(8, 20)
    again = warm["qwen3"].generate(prompt_ids=turn, max_tokens=6)
    assert again.num_cached_tokens == 9 * BLOCK
    assert again.token_ids == cold["qwen3"].generate(prompt_ids=turn, max_tokens=6).token_ids
    assert first.token_ids == cold["qwen3"].generate(prompt_ids=prompt, max_tokens=6).token_ids


def test_chunk_ends_keep_every_pass_at_least_min_rows():
    assert invariant_chunk_ends(0, 2048, 1024, 16) == [1024, 2048]
    assert invariant_chunk_ends(0, 2050, 1024, 16) == [1024, 2050]
    assert invariant_chunk_ends(1792, 2100, 1024, 16) == [2048, 2100]
    assert invariant_chunk_ends(1792, 2050, 1024, 16) == [2050]  # [2048, 2050) alone would be 2 rows
    assert invariant_chunk_ends(1008, 1030, 1024, 16) == [1030]
    assert invariant_chunk_ends(1008, 1040, 1024, 16) == [1024, 1040]
    assert invariant_chunk_ends(0, 5, 1024, 16) == [5]  # a prompt shorter than min_rows: one short pass
    for start in range(0, 200, 16):
        for end in range(start + 16, 400):
            ends = invariant_chunk_ends(start, end, 64, 16)
            lengths = [b - a for a, b in zip([start, *ends], ends)]
            assert ends[-1] == end and min(lengths) >= 16 and max(lengths) <= 64 + 15


def test_the_check_finds_rows_that_depend_on_the_pass_length(tiny_fp32_dirs):
    """A model whose MLP adds a term that grows with the pass's row count is not row-invariant."""
    from transformers import AutoModelForCausalLM

    from kvcellar.engine import attention

    model = AutoModelForCausalLM.from_pretrained(tiny_fp32_dirs["qwen3"], dtype=torch.float32,
                                                 attn_implementation=attention.register()).eval()  # fmt: skip
    assert check_row_invariance(model, BLOCK, 4 * BLOCK, ROW_INVARIANT_MIN_ROWS).holds
    model.model.layers[0].mlp.register_forward_hook(lambda module, args, out: out + 1e-6 * out.shape[1])
    check = check_row_invariance(model, BLOCK, 4 * BLOCK, ROW_INVARIANT_MIN_ROWS)
    assert not check.holds and "differ" in check.detail


def test_a_failed_check_falls_back_to_the_fixed_schedule(tiny_fp32_dirs, monkeypatch, caplog):
    monkeypatch.setattr(schedule, "check_row_invariance", lambda *args: RowCheck(False, "layer 0's K/V differ"))
    with caplog.at_level(logging.WARNING, logger="kvcellar.engine.schedule"):
        with Engine.load(str(tiny_fp32_dirs["qwen3"]), block_size=BLOCK, prefill_schedule="row-invariant") as engine:
            assert engine.config.prefill_schedule == "fixed"
            assert engine._worker.runner.min_rows is None
            assert getattr(engine.loaded.model.config, "kvcellar_query_piece", None) is None
            prompt = _ids(3, 3 * BLOCK + 4)
            engine.generate(prompt_ids=prompt, max_tokens=2)
            assert engine.generate(prompt_ids=prompt + _ids(4, 5), max_tokens=2).num_cached_tokens == 3 * BLOCK
    assert "row-invariant prefill not used" in caplog.text and "layer 0's K/V differ" in caplog.text


def test_near_mode_and_an_explicit_fixed_schedule_run_no_check(tiny_fp32_dirs, monkeypatch):
    monkeypatch.setattr(invariance, "check_row_invariance", lambda *args: pytest.fail("checked"))
    monkeypatch.setattr(schedule, "check_row_invariance", lambda *args: pytest.fail("checked"))
    for options in ({"cache": CacheConfig(exact=False)}, {"prefill_schedule": "fixed"}):
        with Engine.load(str(tiny_fp32_dirs["qwen3"]), block_size=BLOCK, **options) as engine:
            assert engine.config.prefill_schedule == "fixed"


def test_a_schedule_name_is_checked():
    with pytest.raises(ValueError, match="prefill_schedule must be one of auto, fixed, row-invariant"):
        Engine.load("unused", prefill_schedule="one-pass")
