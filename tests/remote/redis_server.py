"""A real redis-server (or valkey-server) for tests: its own port on 127.0.0.1, its own folder, no persistence.

`RedisServer(folder)`: `start()`, `stop()` (SHUTDOWN NOSAVE), `kill()`
(SIGKILL, as a crash), `restart()` (same port, empty), `client()`, `url`.
Tests that claim sharing or fault tolerance use this, never a mock.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest


def server_binary() -> str | None:
    return shutil.which("redis-server") or shutil.which("valkey-server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    def __init__(self, folder: Path, maxmemory: str = "0", policy: str = "allkeys-lru") -> None:
        binary = server_binary()
        if binary is None:
            pytest.fail("redis-server is not installed: `.ci/run` installs Debian's redis-server (apt-get install redis-server)")
        self.binary = binary
        self.folder = folder
        self.port = free_port()
        self.maxmemory = maxmemory
        self.policy = policy
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        command = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
            "--save", "", "--appendonly", "no", "--maxmemory", self.maxmemory, "--maxmemory-policy", self.policy,
            "--protected-mode", "yes", "--logfile", str(self.folder / "server.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # bounds a hang only: the loop ends when the server answers
            try:
                if self.client().ping():
                    return self
            except Exception:
                if self.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited: {(self.folder / 'server.log').read_text()[-2000:]}")
                time.sleep(0.02)
        raise RuntimeError("redis-server did not answer within 30 s")

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def stop(self) -> None:
        self.kill()

    def restart(self) -> RedisServer:
        self.kill()
        return self.start()
