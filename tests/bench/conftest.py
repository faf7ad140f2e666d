"""Fixtures for the bench tests: a tiny `kvcellar serve` (the tiny workloads are in support.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest

from .support import BLOCK, SRC


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def tiny_server(tiny_model_dirs, tmp_path) -> Iterator[str]:
    """`kvcellar serve` on the tiny qwen3 folder (block 16, one thread); yields its base URL."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)}
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen([sys.executable, "-m", "kvcellar.cli", "serve", "--model", str(tiny_model_dirs["qwen3"]),
                                "--port", str(port), "--block-size", str(BLOCK), "--threads", "1",
                                "--cache-dir", str(tmp_path / "kv-cache")],
                               stdout=log, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url + "/health", timeout=1).read()
                break
            except OSError:
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(30)
        log.close()
