"""The rate windows, with a fake clock: exact deltas, spans and rates."""

from __future__ import annotations

from kvcellar.server.rates import RateWindows


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def counters(hit: int, miss: int, requests: int = 0) -> dict:
    return {"hit_tokens": hit, "miss_tokens": miss, "saved_tokens": hit, "requests": requests}


def test_sample_keeps_one_snapshot_per_interval():
    clock = Clock()
    rates = RateWindows(interval_s=10, horizon_s=60, clock=clock)
    rates.sample(counters(0, 0))
    clock.now += 5
    rates.sample(counters(1, 1))  # too soon: dropped
    clock.now += 5
    rates.sample(counters(2, 2))
    assert [h["time_s"] for h in rates.history()] == [1000.0, 1010.0]
    assert [h["hit_tokens"] for h in rates.history()] == [0, 2]


def test_windows_use_the_oldest_snapshot_inside_each_window():
    clock = Clock()
    rates = RateWindows(interval_s=30, horizon_s=900, clock=clock)
    for step in range(31):  # one snapshot every 30 s for 15 minutes: hit_tokens = 10 per step
        rates.sample(counters(10 * step, 5 * step, requests=step))
        clock.now += 30
    clock.now -= 30  # "now" is the time of the last snapshot (step 30)
    windows = rates.windows(counters(300, 150, requests=30))
    assert windows["1m"]["span_s"] == 60 and windows["1m"]["hit_tokens"] == 20 and windows["1m"]["miss_tokens"] == 10
    assert windows["5m"]["span_s"] == 300 and windows["5m"]["requests"] == 10
    assert windows["15m"]["span_s"] == 900 and windows["15m"]["saved_tokens"] == 300
    assert windows["1m"]["hit_rate"] == 20 / 30
    assert windows["5m"]["saved_tokens_per_s"] == 100 / 300
    assert windows["5m"]["requests_per_s"] == 10 / 300


def test_ring_is_bounded_and_a_young_server_reports_its_real_span():
    clock = Clock()
    rates = RateWindows(interval_s=1, horizon_s=10, clock=clock)
    for step in range(100):
        rates.sample(counters(step, 0))
        clock.now += 1
    assert len(rates.history()) == 12  # horizon / interval + 2
    young = RateWindows(interval_s=5, clock=clock)
    young.sample(counters(0, 0))
    clock.now += 20
    window = young.windows(counters(40, 10))["15m"]
    assert window["span_s"] == 20 and window["hit_rate"] == 0.8 and window["saved_tokens_per_s"] == 2


def test_no_snapshot_and_no_lookups_give_zero_rates():
    window = RateWindows(clock=Clock()).windows(counters(0, 0))["1m"]
    assert window["hit_rate"] == 0.0 and window["requests_per_s"] == 0.0 and window["span_s"] == 0
