"""CPU priority of the disk tier's background writer thread.

Operations: `idle_is_reversible()` (whether a thread here may leave
SCHED_IDLE again), `set_current_thread_idle(idle)`, called by the writer
thread itself.

On Linux, scheduling policy is per thread (pid 0 names the calling thread),
so this changes the writer alone, never the request thread or torch's OpenMP
team. Elsewhere (macOS, Windows) there is no per-thread form in `os`.

Why the writer runs at SCHED_IDLE: a file written during a prefill slows it
by several times the writer's own CPU time (page-cache copy and writeback);
at SCHED_IDLE its work runs on cores the model leaves idle. Why it must be
able to leave SCHED_IDLE: while every core is busy (back-to-back prefills,
other processes) an idle-priority thread barely runs, so a backlog that must
be written (queue nearly full, a flush or a budget cut waiting) would be
dropped instead. Leaving SCHED_IDLE needs CAP_SYS_NICE or an RLIMIT_NICE of
20; where it is refused the writer never enters it and paces itself by
waiting for the model alone (queue.py).
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)


def set_current_thread_idle(idle: bool) -> bool:
    """Put the calling thread at SCHED_IDLE (`idle`) or back at the normal policy; False if refused or unsupported."""
    set_scheduler = getattr(os, "sched_setscheduler", None)
    sched_idle, sched_other = getattr(os, "SCHED_IDLE", None), getattr(os, "SCHED_OTHER", None)
    if set_scheduler is None or sched_idle is None or sched_other is None:
        return False
    try:
        set_scheduler(0, sched_idle if idle else sched_other, os.sched_param(0))  # pid 0: this thread only
        return True
    except OSError as exc:  # EPERM: leaving SCHED_IDLE needs CAP_SYS_NICE; a seccomp profile may refuse both
        log.debug("disk writer priority change to %s refused: %s", "SCHED_IDLE" if idle else "normal", exc)
        return False


def idle_is_reversible() -> bool:
    """Whether a thread may enter SCHED_IDLE and leave it again; tried in a throwaway thread."""
    result: list[bool] = []

    def probe() -> None:
        result.append(set_current_thread_idle(True) and set_current_thread_idle(False))

    thread = threading.Thread(target=probe, name="kvcellar-priority-probe")
    thread.start()
    thread.join()
    return result[0]
