"""`kvcellar cluster` end to end: a real redis-server, two real servers and vllm-router, started and stopped as one.

Through the router, a conversation's turns are served; asked directly, the server that did not compute a
prompt serves it from the shared tier; SIGTERM stops every process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import requests

from tests.server.support import SRC, free_port

pytestmark = pytest.mark.slow


def test_the_cluster_command_starts_shares_and_stops(tiny_model_dirs, tmp_path, wait_for):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "kvcellar.cli", "cluster", "--model", str(tiny_model_dirs["qwen3"]),
               "--port", str(port), "--folder", str(tmp_path / "cluster"), "--",
               "--block-size", "16", "--threads", "1", "--no-disk-tier"]  # fmt: skip
    cluster = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    lines: list[str] = []
    try:
        while not any(line.startswith("shared tier:") for line in lines):
            line = cluster.stdout.readline()
            assert line, f"the cluster exited while starting:\n{''.join(lines)}"
            lines.append(line)
        router = next(line.split(": ", 1)[1].strip().removesuffix("/v1") for line in lines if line.startswith("router"))
        servers = [line.split()[1] for line in lines if line.startswith("server:")]
        assert len(servers) == 2
        assert requests.get(router + "/v1/models", timeout=30).json()["data"][0]["id"] == "qwen3"

        prompt = list(range(300, 300 + 100))
        body = {"model": "qwen3", "prompt": prompt, "max_tokens": 4, "temperature": 0}
        first = requests.post(router + "/v1/completions", json=body, timeout=60).json()
        again = requests.post(router + "/v1/completions", json=body, timeout=60).json()
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 100  # the router kept it where it is warm
        assert again["choices"] == first["choices"]

        def cached_by_tier(url: str) -> dict:
            found = requests.post(url + "/v1/cache/probe", json={"model": "qwen3", "prompt": prompt}, timeout=30).json()
            return found["cached_tokens_by_tier"]

        # The server the router did not pick holds nothing of the prompt itself; once the other's blocks reach
        # Redis, it finds them there.
        (other,) = wait_for(lambda: [url for url in servers if cached_by_tier(url).get("remote", 0) >= 96
                                     and not cached_by_tier(url).get("device")], "the blocks to reach Redis", 60)
        answer = requests.post(other + "/v1/completions", json=body, timeout=60).json()
        assert answer["usage"]["prompt_tokens_details"]["cached_tokens_by_tier"].get("remote", 0) >= 96
        assert answer["choices"][0]["text"] == first["choices"][0]["text"]
    finally:
        cluster.send_signal(signal.SIGTERM)
        output, _ = cluster.communicate(timeout=300)
    assert cluster.returncode == 0, output
    for url in [router, *servers]:  # every process ended with the command
        with pytest.raises(requests.ConnectionError):
            requests.get(url + "/health", timeout=5)
