"""Fixtures for the remote tier: a real redis-server per test (port and folder of its own)."""

from __future__ import annotations

import pytest

from tests.remote.redis_server import RedisServer


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()
