"""CPU priority of the disk tier's background writer thread.

Operation: `lower_current_thread()`, called by the writer thread itself.

On Linux, scheduling policy and nice value are per thread (pid 0 / a native
thread id name the calling thread), so this lowers the writer alone, never
the request thread or torch's OpenMP team. Elsewhere (macOS, Windows) there
is no per-thread form in `os`: the thread keeps its priority.

Why (measured on the 2-core VM, 2 torch threads): eight 29 MB entry files
written during a 1536-token prefill (pages dropped after each fsync) made it
2.40 s against 2.20 s with no writes (medians of 6); with the writer at
SCHED_IDLE 2.25 s, its files then finishing after the prefill. The engine thread was not slowed waiting for a
GIL or lock held by the starved writer: when the engine thread blocks, its
core goes idle and SCHED_IDLE work runs at once. Nice 19 alone (a CFS weight
of 15 against 1024: still a share of a busy core) did not measurably help in an
earlier benchmark run; it is kept only as a fallback.

Consequence: while every core is busy (back-to-back prefills, or other
processes), the writer barely runs, even for writes the queue marks urgent:
the queue fills and further writes are dropped (counted) instead of slowing
the prefills (a 40-prompt back-to-back benchmark: 103 drops, 4 at normal
priority, whose sixth requests were then up to 1.7x slower).
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)
LOWEST_NICE = 19


def lower_current_thread() -> str:
    """Lower the calling thread to the lowest CPU priority the OS offers per thread.

    Returns what was applied: "sched_idle", "nice" (SCHED_IDLE refused) or
    "unchanged" (no per-thread form here, or both refused). Never raises:
    the writer works the same at normal priority, only competing more.
    """
    set_scheduler = getattr(os, "sched_setscheduler", None)
    sched_idle = getattr(os, "SCHED_IDLE", None)
    if set_scheduler is not None and sched_idle is not None:  # Linux
        try:
            set_scheduler(0, sched_idle, os.sched_param(0))  # pid 0: this thread only
            return "sched_idle"
        except OSError as exc:  # e.g. a seccomp profile that refuses it
            log.debug("SCHED_IDLE refused for the disk writer: %s", exc)
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOWEST_NICE)  # a Linux tid: one thread
            return "nice"
        except OSError as exc:
            log.debug("nice %d refused for the disk writer: %s", LOWEST_NICE, exc)
    return "unchanged"
