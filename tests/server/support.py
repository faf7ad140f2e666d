"""Helpers for the server tests: a real `kvcellar serve` process on 127.0.0.1, prompt text.

Every process gets --threads 1: on a small CI machine two torch threads per
process fight the test's own client threads.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import requests

SRC = Path(__file__).resolve().parents[2] / "src"
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 300.0  # bounds a hang only: draining queued disk writes on a loaded machine takes what it takes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(self, model_dir: Path, log_path: Path, *args: str, admin_key: str | None = None,
                 port: int | None = None) -> None:  # fmt: skip
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.admin_key = admin_key
        self.log_path = log_path
        self.model_dir = model_dir
        self.model = model_dir.stem if model_dir.suffix == ".gguf" else model_dir.name  # a GGUF is served by its stem
        command = [sys.executable, "-m", "kvcellar.cli", "--log-level", "debug", "serve", "--model", str(model_dir),
                   "--host", "127.0.0.1", "--port", str(self.port), "--block-size", "16", "--threads", "1", *args]
        if "--cache-dir" not in args:  # servers share nothing on disk unless a test asks for a folder
            command.append("--no-disk-tier")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self._wait_until_up()

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                requests.get(self.base_url + "/health", timeout=1.0)
                return
            except requests.ConnectionError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not answer within {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_tail(self, num_chars: int = 4000) -> str:
        return self.log_text()[-num_chars:]

    def headers(self, key: str | None = None) -> dict[str, str]:
        key = key or self.admin_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def get(self, path: str, key: str | None = None, **kwargs) -> requests.Response:
        return requests.get(self.base_url + path, headers=self.headers(key), timeout=30.0, **kwargs)

    def post(self, path: str, body: object = None, key: str | None = None, **kwargs) -> requests.Response:
        return requests.post(self.base_url + path, json=body, headers=self.headers(key), timeout=60.0, **kwargs)

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=key or self.admin_key or "unused",
                             max_retries=0, timeout=60.0)  # fmt: skip

    def tokenizer(self) -> object:
        """The served model folder's tokenizer (to name token ids in requests)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_dir)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # a graceful stop: the disk tier drains before the exit
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()


def long_text(tag: str, num_words: int = 40) -> str:
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
    return f"{tag} " + " ".join(words[i % len(words)] for i in range(num_words))


def metric(text: str, name: str) -> float:
    """One unlabelled series' value in a Prometheus text page."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
