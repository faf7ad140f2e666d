"""The processes of a cluster: a redis-server, kvcellar servers, a router; started, awaited, stopped together.

Operations: `Processes` (a group: `redis`, `server`, `router` start one
each and wait until it answers; `stop` ends them all, newest first, SIGTERM
then SIGKILL), `free_port`, `find_binary`, `wait_http`.

Everything binds 127.0.0.1 unless a host is given. Each process writes its
output to a log file in the group's folder; a process that exits while
starting raises with the tail of its log.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

START_TIMEOUT_S = 300.0
# vllm-router's cache_aware: go to the least loaded server whenever loads differ at all, else where the prefix is.
ROUTER_BALANCE = ("--balance-abs-threshold", "0", "--balance-rel-threshold", "1.0")
STOP_TIMEOUT_S = 120.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def find_binary(*names: str, hint: str) -> str:
    """The first of `names` on PATH or beside this Python; RuntimeError with `hint` when none is installed."""
    for name in names:
        beside = Path(sys.executable).with_name(name)
        found = shutil.which(name) or (str(beside) if beside.exists() else None)
        if found:
            return found
    raise RuntimeError(f"none of {', '.join(names)} is installed: {hint}")


def wait_http(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float = START_TIMEOUT_S) -> None:
    """Return once GET `url` answers 200; RuntimeError if the process exits first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} while starting:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=2.0) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s:\n{_tail(log_path)}")


def _tail(path: Path, num_chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-num_chars:]
    except OSError:
        return "(no log)"


class Processes:
    def __init__(self, folder: Path, host: str = "127.0.0.1") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.host = host
        self._started: list[tuple[str, subprocess.Popen]] = []

    def _spawn(self, name: str, command: list[str]) -> tuple[subprocess.Popen, Path]:
        log_path = self.folder / f"{name}.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._started.append((name, process))
        return process, log_path

    def redis(self, port: int, maxmemory: str = "0", policy: str = "allkeys-lru") -> str:
        """Start redis-server (or valkey-server) without persistence; its URL."""
        binary = find_binary("redis-server", "valkey-server", hint="install redis-server or valkey-server "
                             "(Debian: apt-get install redis-server), or pass the URL of a running one")  # fmt: skip
        data = self.folder / "redis-data"
        data.mkdir(exist_ok=True)
        command = [binary, "--port", str(port), "--bind", self.host, "--dir", str(data), "--save", "",
                   "--appendonly", "no", "--maxmemory", maxmemory, "--maxmemory-policy", policy]  # fmt: skip
        process, log_path = self._spawn(f"redis-{port}", command)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"redis-server exited while starting:\n{_tail(log_path)}")
            try:
                with socket.create_connection((self.host, port), timeout=1.0) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return f"redis://{self.host}:{port}/0"
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {port} within 30 s")

    def server(self, name: str, port: int, model: str, args: list[str]) -> str:
        """Start `kvcellar serve` on `port` with `args`; its base URL once /health answers."""
        command = [sys.executable, "-m", "kvcellar.cli", "serve", "--model", model, "--host", self.host,
                   "--port", str(port), *args]  # fmt: skip
        process, log_path = self._spawn(name, command)
        url = f"http://{self.host}:{port}"
        wait_http(url + "/health", process, log_path)
        return url

    def router(self, port: int, workers: list[str], policy: str) -> str:
        """Start vllm-router over `workers` with `policy`; its base URL once /v1/models answers.

        `cache_aware` balances as soon as the servers' loads differ (ROUTER_BALANCE): with the router's own
        thresholds (a 64-request gap) a system prompt shared by every conversation sends them all to one server.
        """
        binary = find_binary("vllm-router", hint="pip install vllm-router (docs/deployment.md)")
        command = [binary, "--host", self.host, "--port", str(port), "--worker-urls", *workers, "--policy", policy,
                   "--log-level", "warning", "--prometheus-host", self.host,
                   "--prometheus-port", str(free_port(self.host)), *(ROUTER_BALANCE if policy == "cache_aware" else ())]  # fmt: skip
        process, log_path = self._spawn(f"router-{port}", command)
        url = f"http://{self.host}:{port}"
        wait_http(url + "/v1/models", process, log_path)
        return url

    def exited(self) -> list[str]:
        """The names of the processes started that are no longer running."""
        return [name for name, process in self._started if process.poll() is not None]

    def stop(self) -> None:
        """SIGTERM every process, newest first (router, servers, then Redis), each given time to drain."""
        for name, process in reversed(self._started):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for name, process in reversed(self._started):
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        self._started.clear()
