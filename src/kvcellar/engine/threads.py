"""CPU threads sized to the cores that other processes leave free (CPU only, threads not set by the user).

Why: a forward pass splits its work evenly over its OpenMP threads and waits for the slowest. With
another busy process on one of the cores, the thread that shares that core holds every pass back, and
the request takes far longer than on the free cores alone (docs/benchmarks.md, "Under contention").
So a sampling thread counts, over each short window, the cores other processes kept busy (/proc/stat,
minus this process's own CPU time), and before each pass the model's thread runs on the cores left,
never fewer than one. A core is given up only to contention that lasted the last `SUSTAINED_S`: a pass
keeps the thread count it starts with for its whole length, and a burst of a fraction of a second (a
client starting its requests) once halved a multi-second prefill. A freed core is taken back at once.

Why only where checked: exact mode promises bit-identical output, so a pass must round alike whatever
thread count runs it. The engine checks that when it loads (`thread_counts_alike` in
engine/invariance.py) and sizes only among the thread counts that passed.

Operations: `ThreadSizer(counts, read_busy)`, `.adjust()` (cheap: reads the last window's
count), `.close()`, `cpu_busy_seconds()` (the machine's busy CPU seconds, None off Linux).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger(__name__)

LOOK_EVERY_S = 0.25  # shorter windows count too few clock ticks to tell a busy core from noise
SUSTAINED_S = 1.0  # contention must have lasted this long (the last windows' least) to take a core away
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_busy_seconds() -> float | None:
    """Busy CPU seconds, since boot, of the CPUs this process may run on (None where /proc/stat is missing)."""
    try:
        allowed = {f"cpu{index}" for index in os.sched_getaffinity(0)}
        with open("/proc/stat") as stat:
            lines = [line.split() for line in stat if line.startswith("cpu") and not line.startswith("cpu ")]
    except (OSError, AttributeError):
        return None
    busy = 0
    for fields in lines:
        if fields[0] in allowed:
            ticks = [int(value) for value in fields[1:8]]  # user nice system idle iowait irq softirq
            busy += sum(ticks) - ticks[3] - ticks[4]
    return busy / _CLOCK_TICKS


class ThreadSizer:
    """Chooses the thread count, among `counts` (checked alike), for the cores other processes leave free.

    A sampling thread looks every `LOOK_EVERY_S` and keeps the windows of the last `SUSTAINED_S`; the
    threads fit the least count of cores other processes kept busy in any of them. So a request that
    starts after a busy spell (a peer server's benchmark turn, say) is sized by the last second, not by
    the whole pause since the last request, and a burst shorter than that takes no core away.
    """

    def __init__(self, counts: Sequence[int], read_busy: Callable[[], float | None] = cpu_busy_seconds,
                 sample: bool = True) -> None:  # fmt: skip
        self.counts = sorted(counts)
        self._read_busy = read_busy
        self._cores = max(self.counts)
        self.threads = self._cores
        self.others = 0.0  # cores other processes kept busy in the last window
        self._windows: deque[tuple[float, float]] = deque()  # (seconds, others) of the windows, newest last
        self._last = self._look()
        self._stopped = threading.Event()
        if sample and self._last is not None:
            threading.Thread(target=self._sample_forever, name="kvcellar-thread-sizer", daemon=True).start()

    def _look(self) -> tuple[float, float, float] | None:
        busy = self._read_busy()
        return None if busy is None else (time.monotonic(), busy, time.process_time())

    def sample(self) -> None:
        """Close the current window if it is old enough: `others` becomes its count of busy cores."""
        if self._last is None or time.monotonic() - self._last[0] < LOOK_EVERY_S:
            return
        now = self._look()
        if now is None:
            return
        wall, busy, own = (now[index] - self._last[index] for index in range(3))
        self._last = now
        self.others = max(0.0, busy - own) / wall
        self._windows.append((wall, self.others))
        while sum(seconds for seconds, _ in self._windows) - self._windows[0][0] >= SUSTAINED_S:
            self._windows.popleft()  # the newer windows cover SUSTAINED_S without it

    def sustained(self) -> float:
        """The cores other processes kept busy throughout the last SUSTAINED_S (the least of its windows)."""
        return min((others for _, others in self._windows), default=0.0)

    def _sample_forever(self) -> None:
        while not self._stopped.wait(LOOK_EVERY_S):
            self.sample()

    def close(self) -> None:
        self._stopped.set()

    def adjust(self) -> int:
        """Set torch's threads (on the calling thread: the model's) to fit the last window; returns the count."""
        others = self.sustained()
        fits = [count for count in self.counts if count <= max(1.0, self._cores - others) + 0.5]
        wanted = max(fits) if fits else self.counts[0]
        if wanted != self.threads:
            log.info("other processes keep %.1f cores busy: computing on %d thread(s)", others, wanted)
            torch.set_num_threads(wanted)
            self.threads = wanted
        return wanted
