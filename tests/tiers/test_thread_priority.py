"""The disk writer thread runs at SCHED_IDLE, and at normal priority while its backlog is pressing.

Only its own thread changes; where SCHED_IDLE cannot be left again the thread never enters it.
"""

from __future__ import annotations

import os
import sys
import threading

import pytest

from kvcellar.tiers.disk import queue as writer, thread_priority
from kvcellar.tiers.disk.thread_priority import idle_is_reversible, set_current_thread_idle
from kvcellar.tiers.disk.queue import WriteQueue

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread scheduling policy is Linux-only")


def _in_thread(fn):
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


@linux_only
def test_on_linux_the_calling_thread_alone_changes_policy():
    before = os.sched_getscheduler(0)
    if not idle_is_reversible():
        pytest.skip("leaving SCHED_IDLE needs CAP_SYS_NICE here")

    def idle_then_back():
        entered = (set_current_thread_idle(True), os.sched_getscheduler(0))
        left = (set_current_thread_idle(False), os.sched_getscheduler(0))
        return entered, left

    assert _in_thread(idle_then_back) == ((True, os.SCHED_IDLE), (True, os.SCHED_OTHER))
    assert os.sched_getscheduler(0) == before  # the caller (here: the test's thread) is untouched


class _NoOs:
    """An `os` with no per-thread priority calls (macOS, Windows)."""

    def __getattr__(self, name):
        if name in ("sched_setscheduler", "SCHED_IDLE"):
            raise AttributeError(name)
        return getattr(os, name)


def test_without_per_thread_calls_nothing_changes(monkeypatch):
    monkeypatch.setattr(thread_priority, "os", _NoOs())
    assert _in_thread(lambda: set_current_thread_idle(True)) is False
    assert idle_is_reversible() is False


@linux_only
def test_where_sched_idle_cannot_be_left_the_writer_stays_at_normal_priority(monkeypatch):
    real = os.sched_setscheduler
    calls = []

    def refuse_leaving(pid, policy, param):  # an unprivileged process: entering is allowed, leaving is not
        calls.append(policy)
        if policy != os.SCHED_IDLE:
            raise PermissionError("refused")
        return real(pid, policy, param)

    monkeypatch.setattr(thread_priority.os, "sched_setscheduler", refuse_leaving)
    assert idle_is_reversible() is False  # the probe thread paid for the answer, not the writer
    calls.clear()
    queue = WriteQueue(_Handler(), max_entries=1, max_bytes=1)
    queue.start()
    assert queue.flush(60.0)
    queue.close(60.0)
    assert queue.priority == "normal" and calls == [os.SCHED_IDLE, os.SCHED_OTHER]  # only the writer's own probe


class _Handler:
    def __init__(self) -> None:
        self.policies: list[int] = []
        self.wrote = threading.Event()

    def delete_files(self, items):
        pass

    def write_batch(self, jobs, wait_turn):
        for _ in jobs:
            wait_turn()
            self.policies.append(os.sched_getscheduler(0))
        self.wrote.set()

    def sync_recency(self):
        pass


@linux_only
def test_the_writer_leaves_sched_idle_only_while_its_backlog_is_pressing():
    if not idle_is_reversible():
        pytest.skip("leaving SCHED_IDLE needs CAP_SYS_NICE here")
    handler = _Handler()
    queue = WriteQueue(handler, max_entries=8, max_bytes=800)
    assert queue.try_reserve(100)
    queue.put("a", "a", 100)  # 1 of 8: not pressing
    queue.start()
    assert handler.wrote.wait(60.0)  # no flush: a flush waiting is pressing too
    queue.defer(True)
    assert writer.HIGH_WATER * 8 == 7
    for job in "bcdefgh":  # 7 of 8 reserved = HIGH_WATER: pressing, so written during the "prefill"
        assert queue.try_reserve(100)
        queue.put(job, job, 100)
    assert queue.flush(60.0)
    queue.defer(False)
    queue.close(60.0)
    assert queue.priority == "sched_idle+normal"
    assert handler.policies == [os.SCHED_IDLE] + [os.SCHED_OTHER] * 7
