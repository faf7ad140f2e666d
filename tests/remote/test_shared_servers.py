"""Two real `kvcellar serve` processes sharing one real redis-server: what one computed, the other serves.

Exact mode (the CPU default): output with a remote hit is bit-identical to a cache-off server's,
log-probabilities included. Faults (Redis killed and restarted, full, values corrupted) leave both
servers answering correctly within a bounded time, and are counted in /metrics.
"""

from __future__ import annotations

import time

import pytest

from tests.remote.redis_server import RedisServer
from tests.server.support import ServerProcess, metric

pytestmark = pytest.mark.slow
PROMPT = list(range(40, 40 + 150))  # token ids: nine 16-token blocks and a tail
BOUND_S = 60.0  # bounds a hang on a loaded machine; the fault paths themselves add at most one timeout


@pytest.fixture(scope="module")
def shared(tiny_model_dirs, tmp_path_factory):
    """(redis, server A, server B, cache-off server C), A and B on the same Redis (qwen3 tiny, exact mode)."""
    folder = tmp_path_factory.mktemp("shared")
    redis = RedisServer(folder / "redis").start()
    model = tiny_model_dirs["qwen3"]
    # --no-cost-model: every hit is restored whatever the measured rates say (after a fault the remote tier's
    # measured load rate may make the planner recompute a block, which is timing, not what these tests check).
    args = ("--remote-cache", redis.url, "--remote-timeout", "0.5", "--no-cost-model")
    servers = [ServerProcess(model, folder / f"{name}.log", *args) for name in ("a", "b")]
    servers.append(ServerProcess(model, folder / "c.log", "--no-cache"))
    yield redis, *servers
    for server in servers:
        server.stop()
    redis.stop()


def complete(server: ServerProcess, prompt: list[int], **extra) -> dict:
    body = {"model": server.model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 3, **extra}
    started = time.perf_counter()
    answer = server.post("/v1/completions", body)
    assert answer.status_code == 200, answer.text
    answer = answer.json()
    answer["seconds"] = time.perf_counter() - started
    return answer


def output(answer: dict) -> tuple:
    choice = answer["choices"][0]
    return choice["text"], choice["logprobs"]["tokens"], choice["logprobs"]["token_logprobs"], choice["logprobs"]["top_logprobs"]


def cached(answer: dict) -> tuple[int, dict]:
    details = answer["usage"]["prompt_tokens_details"]
    return details["cached_tokens"], details["cached_tokens_by_tier"]


def remote_tokens(server: ServerProcess, prompt: list[int]) -> int:
    found = server.post("/v1/cache/probe", {"model": server.model, "prompt": prompt}).json()
    return found["cached_tokens_by_tier"].get("remote", 0)


def test_server_b_serves_a_prefix_only_server_a_computed_bit_identically(shared, wait_for):
    redis, a, b, off = shared
    prompt = [7, *PROMPT]
    first = complete(a, prompt)
    assert cached(first)[0] == 0
    wait_for(lambda: remote_tokens(b, prompt) >= 144, "A's blocks to reach Redis", BOUND_S)
    second = complete(b, prompt)
    num_cached, by_tier = cached(second)
    assert by_tier.get("remote", 0) >= 144 and num_cached == by_tier["remote"]
    assert output(second) == output(first) == output(complete(off, prompt))
    page = b.get("/metrics").text
    assert metric(page, "kvcellar_remote_loads_total") >= 9 and metric(page, "kvcellar_remote_up") == 1
    assert b.get("/health").json()["remote_cache"]["connected"] is True


def test_other_salts_never_share(shared, wait_for):
    redis, a, b, off = shared
    prompt = [8, *PROMPT]
    complete(a, prompt, cache_salt="tenant-one")
    wait_for(lambda: b.post("/v1/cache/probe", {"model": b.model, "prompt": prompt, "cache_salt": "tenant-one"}).json()
             ["cached_tokens_by_tier"].get("remote", 0) >= 144, "A's salted blocks to reach Redis", BOUND_S)  # fmt: skip
    assert cached(complete(b, prompt, cache_salt="tenant-two"))[0] == 0
    assert cached(complete(b, prompt))[0] == 0  # the default salt is another namespace too


def test_another_model_never_shares(shared, tiny_model_dirs, tmp_path, wait_for):
    redis, a, b, off = shared
    prompt = [9, *PROMPT]
    complete(a, prompt)
    wait_for(lambda: remote_tokens(b, prompt) >= 144, "A's blocks to reach Redis", BOUND_S)
    other = ServerProcess(tiny_model_dirs["gemma3"], tmp_path / "gemma.log", "--remote-cache", redis.url)
    try:
        assert cached(complete(other, prompt))[0] == 0
        assert remote_tokens(other, prompt) == 0
    finally:
        other.stop()


def test_redis_killed_then_restarted_leaves_both_servers_correct(shared, wait_for):
    redis, a, b, off = shared
    prompt = [10, *PROMPT]
    expected = output(complete(off, prompt))
    redis.kill()
    for server in (a, b):
        answer = complete(server, prompt)
        assert output(answer) == expected
        assert answer["seconds"] < BOUND_S
    wait_for(lambda: metric(a.get("/metrics").text, "kvcellar_remote_up") == 0, "A to see Redis down", BOUND_S)
    redis.start()
    for server in (a, b):
        wait_for(lambda: server.get("/health").json()["remote_cache"]["connected"], "the server to reconnect", BOUND_S)
    prompt = [11, *PROMPT]
    assert output(complete(a, prompt)) == output(complete(off, prompt))
    wait_for(lambda: remote_tokens(b, prompt) >= 144, "A's blocks to reach the restarted Redis", BOUND_S)
    assert cached(complete(b, prompt))[1].get("remote", 0) >= 144
    for server in (a, b):
        page = server.get("/metrics").text
        assert metric(page, "kvcellar_remote_reconnects_total") >= 1
        assert metric(page, "kvcellar_remote_connection_errors_total") + metric(page, "kvcellar_remote_timeouts_total") >= 1


def test_corrupt_values_are_misses_and_deleted(shared, wait_for):
    redis, a, b, off = shared
    prompt = [12, *PROMPT]
    complete(a, prompt)
    wait_for(lambda: remote_tokens(b, prompt) >= 144, "A's blocks to reach Redis", BOUND_S)
    client = redis.client()
    names = list(client.scan_iter(match="kvcellar:e:*"))
    for name in names:
        value = bytearray(client.get(name))
        value[len(value) // 2] ^= 0x40
        client.set(name, bytes(value))
    answer = complete(b, prompt)
    assert output(answer) == output(complete(off, prompt))
    assert cached(answer)[1].get("remote", 0) == 0
    assert metric(b.get("/metrics").text, "kvcellar_remote_corrupt_total") >= 1


def test_a_full_redis_costs_writes_not_answers(shared, wait_for):
    redis, a, b, off = shared
    client = redis.client()
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", client.info("memory")["used_memory"] + 64 * 1024)
    try:
        for tag in range(13, 17):
            prompt = [tag, *PROMPT]
            for server in (a, b):
                assert output(complete(server, prompt)) == output(complete(off, prompt))
        wait_for(lambda: metric(a.get("/metrics").text, "kvcellar_remote_oom_total") >= 1, "a refused write", BOUND_S)
    finally:
        client.config_set("maxmemory", 0)
        client.config_set("maxmemory-policy", "allkeys-lru")


def test_the_shared_tiers_size_is_redis_own(shared):
    redis, a, b, off = shared
    answer = a.post("/v1/cache/budget", {"tier": "remote", "budget": "1G"})
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "budget_not_settable" and "maxmemory" in answer.json()["error"]["message"]
