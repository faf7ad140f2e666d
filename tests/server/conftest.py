"""Fixtures for the server tests.

`server` is one process for the whole session (tests use their own unique
prompts, so they do not see each other's cache entries); `start_server`
starts extra ones (API keys, restarts), all stopped at the end.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .support import ServerProcess


@pytest.fixture(scope="session")
def server_model_dir(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["qwen3"]


@pytest.fixture(scope="session")
def start_server(server_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """start_server(*args, admin_key=None) -> a running ServerProcess, stopped at the end of the session."""
    started: list[ServerProcess] = []
    logs = tmp_path_factory.mktemp("server-logs")

    def start(*args: str, admin_key: str | None = None) -> ServerProcess:
        process = ServerProcess(server_model_dir, logs / f"server-{len(started)}.log", *args, admin_key=admin_key)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture(scope="session")
def server(start_server) -> ServerProcess:
    return start_server()


@pytest.fixture
def unique() -> str:
    """A fresh word for prompts, so a test never meets another test's cache entries."""
    return uuid.uuid4().hex[:12]
