"""CPU threads sized to the cores other processes leave free (engine/threads.py), only among thread
counts that compute alike (engine/invariance.py). The sizing rule runs on a scripted clock and busy
count (what it isolates: the arithmetic, not the machine's load); the check runs on a real tiny model."""

from __future__ import annotations

import threading

import pytest
import torch

from kvcellar import CacheConfig, Engine
from kvcellar.config import ROW_INVARIANT_MIN_ROWS
from kvcellar.engine import threads
from kvcellar.engine.invariance import thread_counts_alike
from kvcellar.engine.loader import load_model


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


class _Machine:
    """A scripted clock: wall seconds, the machine's busy CPU seconds, and this process's own."""

    def __init__(self, monkeypatch) -> None:
        self.wall = self.busy = self.own = 0.0
        monkeypatch.setattr(threads.time, "monotonic", lambda: self.wall)
        monkeypatch.setattr(threads.time, "process_time", lambda: self.own)

    def run(self, seconds: float, own_cores: float, other_cores: float) -> None:
        self.wall += seconds
        self.own += seconds * own_cores
        self.busy += seconds * (own_cores + other_cores)


def test_threads_follow_the_cores_others_leave_free(monkeypatch, restore_threads):
    machine = _Machine(monkeypatch)
    torch.set_num_threads(4)
    sizer = threads.ThreadSizer([1, 2, 4], read_busy=lambda: machine.busy, sample=False)

    def window(seconds: float, own_cores: float, other_cores: float) -> int:
        machine.run(seconds, own_cores, other_cores)
        sizer.sample()
        return sizer.adjust()

    assert sizer.threads == 4
    assert window(1.0, own_cores=4.0, other_cores=0.0) == 4 and torch.get_num_threads() == 4
    # One busy process beside our four threads: 2.7 cores free, the largest checked count that fits.
    assert window(1.0, own_cores=2.7, other_cores=1.3) == 2 and torch.get_num_threads() == 2
    assert window(1.0, own_cores=2.0, other_cores=2.0) == 2
    assert window(1.0, own_cores=1.0, other_cores=3.9) == 1  # never fewer than one
    soon = threads.LOOK_EVERY_S / 2
    assert window(soon, own_cores=1.0, other_cores=0.0) == 1  # a window too short: not closed yet
    assert window(1.0 - soon, own_cores=1.0, other_cores=0.0) == 4 and torch.get_num_threads() == 4
    # A busy spell long ago does not size a request that starts now: only the last window counts.
    machine.run(10.0, own_cores=0.0, other_cores=4.0)
    sizer.sample()
    assert window(threads.LOOK_EVERY_S, own_cores=0.0, other_cores=0.0) == 4


def test_a_burst_shorter_than_the_sustained_span_takes_no_core_away(monkeypatch, restore_threads):
    machine = _Machine(monkeypatch)
    torch.set_num_threads(2)
    sizer = threads.ThreadSizer([1, 2], read_busy=lambda: machine.busy, sample=False)

    def window(other_cores: float) -> int:
        machine.run(threads.LOOK_EVERY_S, own_cores=1.0, other_cores=other_cores)
        sizer.sample()
        return sizer.adjust()

    assert window(0.0) == 2
    burst = round(threads.SUSTAINED_S / threads.LOOK_EVERY_S)  # windows in the sustained span
    # A client's start: one core busy for less than the span, then idle: both threads all along.
    assert [window(1.0) for _ in range(burst - 1)] + [window(0.0)] == [2] * burst
    # The same load held for the whole span: a core given up, and taken back as soon as it frees.
    assert [window(1.0) for _ in range(burst)] == [2] * (burst - 1) + [1] and torch.get_num_threads() == 1
    assert window(0.0) == 2 and torch.get_num_threads() == 2


def test_the_sampling_thread_stops_on_close():
    before = set(threading.enumerate())
    sizer = threads.ThreadSizer([1, 2])
    (sampler,) = [thread for thread in set(threading.enumerate()) - before if thread.name == "kvcellar-thread-sizer"]
    sizer.close()
    sampler.join(timeout=5)
    assert not sampler.is_alive()


def test_without_proc_stat_the_threads_stay(monkeypatch, restore_threads):
    torch.set_num_threads(2)
    sizer = threads.ThreadSizer([1, 2], read_busy=lambda: None)
    assert sizer.adjust() == 2 and torch.get_num_threads() == 2


def test_the_machine_reports_its_busy_seconds():
    first = threads.cpu_busy_seconds()
    assert first is not None and first > 0
    sum(i * i for i in range(200_000))  # some work of our own
    assert threads.cpu_busy_seconds() >= first


@pytest.mark.parametrize("arch", ["qwen3", "gemma3", "qwen3_5"])
def test_a_thread_count_that_rounds_differently_is_left_out(tiny_model_dirs, restore_threads, arch):
    loaded = load_model(tiny_model_dirs[arch], "cpu", "auto")
    torch.set_num_threads(2)
    assert 2 in thread_counts_alike(loaded.model, [1, 2], ROW_INVARIANT_MIN_ROWS)
    assert torch.get_num_threads() == 2  # put back
    # One thread made to compute differently (its logits nudged): the check must see it.
    nudge = loaded.model.lm_head.register_forward_hook(
        lambda _module, _inputs, output: output + 1e-3 if torch.get_num_threads() == 1 else output)
    try:
        assert thread_counts_alike(loaded.model, [1, 2], ROW_INVARIANT_MIN_ROWS) == [2]
    finally:
        nudge.remove()


def test_an_engine_sizes_threads_only_where_the_user_left_them(tiny_model_dirs, restore_threads):
    torch.set_num_threads(2)
    fixed = Engine.load(str(tiny_model_dirs["qwen3"]), num_threads=2, cache=CacheConfig(enabled=False))
    try:
        assert fixed._worker.runner.threads is None
    finally:
        fixed.close()
    free = Engine.load(str(tiny_model_dirs["qwen3"]), cache=CacheConfig(enabled=False))
    try:
        sizer = free._worker.runner.threads
        assert sizer is None or (2 in sizer.counts and set(sizer.counts) <= {1, 2})
        assert free.generate("threads", max_tokens=3).finish_reason == "length"
    finally:
        free.close()
