"""The restore-vs-recompute plan: exact choices for hand-computed rates."""

import pytest

from kvcellar.cache.cost_model import CostModel, Segment

BLOCK = Segment("disk", num_bytes=1000, num_tokens=10)


def test_without_measurements_everything_found_is_restored():
    assert CostModel().plan([BLOCK, BLOCK], num_rest_tokens=5) == 2


def test_slow_tier_loses_to_fast_prefill():
    model = CostModel(smoothing=1.0)
    model.record_prefill(num_tokens=1000, seconds=1.0)  # 1000 tok/s: a block recomputes in 10 ms
    model.record_load("disk", num_bytes=1000, seconds=0.1)  # 10 KB/s: a block loads in 100 ms
    assert model.plan([BLOCK, BLOCK], num_rest_tokens=5) == 0


def test_fast_tier_prefix_is_kept_and_slow_suffix_recomputed():
    model = CostModel(smoothing=1.0)
    model.record_prefill(num_tokens=100, seconds=1.0)  # 100 tok/s: 100 ms per block
    model.record_load("device", num_bytes=1000, seconds=0.001)
    model.record_load("disk", num_bytes=1000, seconds=0.5)  # 500 ms per block: slower than computing it
    device = Segment("device", 1000, 10)
    assert model.plan([device, device, BLOCK, BLOCK], num_rest_tokens=3) == 2


def test_tie_prefers_restoring():
    model = CostModel(smoothing=1.0)
    model.record_prefill(num_tokens=10, seconds=1.0)
    model.record_load("disk", num_bytes=1000, seconds=1.0)  # exactly as fast as computing a block
    assert model.plan([BLOCK], num_rest_tokens=0) == 1


def test_rates_are_smoothed():
    model = CostModel(smoothing=0.5)
    model.record_prefill(100, 1.0)
    model.record_prefill(300, 1.0)
    assert model.snapshot()["prefill_tokens_per_s"] == pytest.approx(200.0)


def test_bad_smoothing_is_refused():
    with pytest.raises(ValueError, match="smoothing"):
        CostModel(smoothing=0)


def test_a_trailing_logits_entry_is_always_kept():
    model = CostModel(smoothing=1.0)
    model.record_prefill(num_tokens=100, seconds=1.0)
    model.record_load("device", num_bytes=10**9, seconds=1.0)
    blocks = [Segment("device", 1000, 10)] * 3
    assert model.plan([*blocks, Segment("device", 4096, 0)], num_rest_tokens=0) == 4
