"""Phase processes of `kvcellar bench` that never outlive the bench.

Operations: `child_env()` (this environment, with kvcellar's own source
folder first on PYTHONPATH so a child imports the same code without an
install), `run_child(command, env, on_line) -> exit code` (start a child,
hand each line it prints on stdout to `on_line`, and always reap it: on any
exception, Ctrl-C or a stop signal, it is terminated, then killed),
`end_with_parent(parent_pid)` (called first thing in the child),
`stop_signals_interrupt()` (SIGTERM and SIGHUP stop the bench the way Ctrl-C
does, so its `finally` blocks run).

Two guards, because either alone leaves a gap: the parent's `finally` covers
every way the parent itself stops (an exception, SIGINT, SIGTERM, SIGHUP);
Linux's PR_SET_PDEATHSIG covers the one it cannot see (kill -9 of the
parent), by having the kernel send the child SIGTERM when its parent dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

PR_SET_PDEATHSIG = 1
TERMINATE_WAIT_S = 30.0


def child_env() -> dict[str, str]:
    import kvcellar

    src = str(Path(kvcellar.__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}


def end_with_parent(parent_pid: int) -> None:
    """In a child: die with SIGTERM when the parent dies (Linux), and exit now if it is already gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:  # pragma: no cover - refused by the kernel
            return
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(143)


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """While inside: SIGTERM and SIGHUP raise KeyboardInterrupt (as SIGINT does); main thread only."""
    import threading

    names = [name for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {name: signal.signal(getattr(signal, name), signal.default_int_handler) for name in names}
    try:
        yield
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


def run_child(command: list[str], env: dict[str, str], on_line: Callable[[str], None]) -> int:
    """Run `command` to its end, relaying its stdout lines; whatever happens here, the child is gone after."""
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True, bufsize=1)
    try:
        for line in child.stdout:
            on_line(line.rstrip("\n"))
        return child.wait()
    finally:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(TERMINATE_WAIT_S)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        child.stdout.close()
