"""No child process outlives its parent: `python3 run.py serve` and `kvcellar bench` stopped by a signal.

Linux only (process trees are read from /proc). Every wait is on a condition,
bounded only so that a hang fails instead of blocking the suite.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
WAIT_S = 180.0
pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process trees from /proc (Linux)")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every living process below `pid`."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            try:
                found.append((child, (Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode())))
            except OSError:
                continue
            todo.append(child)
    return [(p, cmd) for p, cmd in found if _alive(p)]


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / ".venv" / ".kvcellar-installed").is_file(), reason="needs the set-up of `python3 run.py`")
def test_sigterm_to_run_py_serve_stops_the_server_itself(tiny_model_dirs, tmp_path, wait_for):
    port = _free_port()
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed below
    wrapper = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "serve", "--model", str(tiny_model_dirs["qwen3"]),
                                "--port", str(port), "--threads", "1", "--no-disk-tier"],
                               stdout=log, stderr=subprocess.STDOUT, env=_env())  # fmt: skip
    try:
        def up() -> bool:
            assert wrapper.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                return requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok
            except requests.ConnectionError:
                return False

        wait_for(up, "the server to answer /health", WAIT_S)
        assert _descendants(wrapper.pid) == []  # run.py became the server: nothing below it to orphan
        wrapper.send_signal(signal.SIGTERM)
        assert wrapper.wait(WAIT_S) == 0
        with pytest.raises(requests.ConnectionError):  # nobody holds the port any more
            requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
        log.close()


def _start_bench(model_dir: Path, out: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "kvcellar.cli", "bench", "--model", str(model_dir), "--block-size", "16",
               "--threads", "1", "--lengths", "64,128", "--modes", "no-cache,kvcellar", "--out", str(out)]
    with open(out.parent / "bench.log", "wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=_env())


def _phase_child(bench: subprocess.Popen, wait_for) -> int:
    def found() -> int | None:
        assert bench.poll() is None, "the bench ended before its first phase process was seen"
        phases = [pid for pid, cmd in _descendants(bench.pid) if "kvcellar.bench.phases" in cmd]
        return phases[0] if phases else None

    return wait_for(found, "the bench's first phase process", WAIT_S)


@pytest.mark.slow
def test_sigterm_to_kvcellar_bench_stops_its_phase_and_keeps_partial_results(tiny_model_dirs, tmp_path, wait_for):
    out = tmp_path / "out"
    bench = _start_bench(tiny_model_dirs["qwen3"], out)
    try:
        child = _phase_child(bench, wait_for)
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(WAIT_S) == 130  # stopped like Ctrl-C: its `finally` blocks ran
        assert not _alive(child)
        results = json.loads((out / "results.json").read_text())
        assert results["stopped_early"].startswith("interrupted after ")
        assert "Partial results" in (out / "results.md").read_text()
    finally:
        if bench.poll() is None:
            bench.kill()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux's")
def test_kill_9_of_kvcellar_bench_still_ends_its_phase(tiny_model_dirs, tmp_path, wait_for):
    bench = _start_bench(tiny_model_dirs["qwen3"], tmp_path / "out")
    try:
        child = _phase_child(bench, wait_for)
        bench.kill()
        bench.wait(WAIT_S)
        wait_for(lambda: not _alive(child), "the orphaned phase process to end", WAIT_S)
    finally:
        if bench.poll() is None:
            bench.kill()
