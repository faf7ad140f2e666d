"""The disk writer thread lowers its own CPU priority, and only its own; a no-op where unsupported."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from kvcellar.tiers import thread_priority
from kvcellar.tiers.thread_priority import lower_current_thread
from kvcellar.tiers.writer import WriteQueue


def _in_thread(fn):
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread scheduling policy is Linux-only")
def test_on_linux_the_calling_thread_alone_becomes_sched_idle():
    before = os.sched_getscheduler(0)
    applied, policy = _in_thread(lambda: (lower_current_thread(), os.sched_getscheduler(0)))
    assert (applied, policy) == ("sched_idle", os.SCHED_IDLE)
    assert os.sched_getscheduler(0) == before  # the caller (here: the test's thread) is untouched


class _NoOs:
    """An `os` with no per-thread priority calls (macOS, Windows)."""

    def __getattr__(self, name):
        if name in ("sched_setscheduler", "SCHED_IDLE"):
            raise AttributeError(name)
        return getattr(os, name)


def test_without_per_thread_calls_nothing_changes(monkeypatch):
    monkeypatch.setattr(thread_priority, "os", _NoOs())
    assert _in_thread(lower_current_thread) == "unchanged"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="os.sched_param is Linux-only")
def test_a_refused_sched_idle_falls_back_to_nice_or_nothing(monkeypatch):
    calls = []

    def refuse(*args):
        raise PermissionError("refused")

    monkeypatch.setattr(thread_priority.os, "sched_setscheduler", refuse, raising=False)
    monkeypatch.setattr(thread_priority.os, "SCHED_IDLE", 5, raising=False)
    monkeypatch.setattr(thread_priority.os, "setpriority", lambda *a: calls.append(a), raising=False)
    assert _in_thread(lower_current_thread) == "nice"
    assert calls[0][2] == 19 and calls[0][1] != threading.get_native_id()  # the writer's tid, not ours
    monkeypatch.setattr(thread_priority.os, "setpriority", refuse, raising=False)
    assert _in_thread(lower_current_thread) == "unchanged"


class _Handler:
    def delete_files(self, items):
        pass

    def write_batch(self, jobs, wait_turn):
        pass

    def sync_recency(self):
        pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread scheduling policy is Linux-only")
def test_the_write_queue_thread_runs_at_sched_idle():
    queue = WriteQueue(_Handler(), max_entries=1, max_bytes=1)
    queue.start()
    assert queue.flush(10.0)
    assert queue.priority == "sched_idle"
    queue.close(10.0)
