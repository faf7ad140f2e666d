"""The remote tier against a real redis-server: sharing between tiers, one round trip per chain, faults as misses.

Payloads are raw bytes (RawCodec) derived from their key (tests/tiers/helpers.py), so a wrong payload is
caught without remembering what was stored. Two `RemoteTier`s on one server stand for two kvcellar servers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import pytest
import redis

from kvcellar.cache import Priority
from kvcellar.tiers.codec import RawCodec
from kvcellar.tiers.remote.records import children_key, entry_key
from kvcellar.tiers.remote.tier import RemoteTier
from tests.remote.redis_server import RedisServer
from tests.tiers.helpers import ROOT_A, ROOT_B, chain, make_partial, payload_for

TOKENS = list(range(1, 17))  # four 4-token blocks


@contextlib.contextmanager
def no_network(monkeypatch):
    """Fail the test if the tier, on the test's thread, sends anything to the server meanwhile (a spy on
    redis-py; the server is real; the tiers' background threads pass through)."""
    mine = threading.get_ident()

    def guard(original):
        def call(*args, **kwargs):
            if threading.get_ident() == mine:
                raise AssertionError("the tier tried the server while it is down")
            return original(*args, **kwargs)

        return call

    with monkeypatch.context() as patch:
        patch.setattr(redis.Redis, "execute_command", guard(redis.Redis.execute_command))
        patch.setattr(redis.client.Pipeline, "execute", guard(redis.client.Pipeline.execute))
        yield


def open_remote(server: RedisServer, **options) -> RemoteTier:
    return RemoteTier(server.url, RawCodec(), **({"timeout_s": 2.0} | options))


def store(tier: RemoteTier, entry) -> bool:
    result = tier.prepare_store(entry)
    if result.accepted:
        tier.complete_store(entry.key)
    return result.accepted


def stored_chain(tier: RemoteTier, tokens: list[int], root: bytes = ROOT_A) -> list:
    """The chain of blocks of `tokens`, stored and written (flushed) to the server."""
    blocks = chain(tokens, root=root)
    for entry in blocks:
        store(tier, entry)
    assert tier.flush(30)
    return blocks


@pytest.fixture
def pair(redis_server):
    """Two tiers on one server, as two kvcellar servers would open it."""
    a, b = open_remote(redis_server), open_remote(redis_server)
    yield a, b
    a.close()
    b.close()


def test_an_entry_stored_by_one_tier_is_found_and_loaded_by_another(pair):
    a, b = pair
    blocks = chain(TOKENS)
    tail = make_partial(blocks[-1].key, [7, 7], has_logits=True)
    for entry in [*blocks, tail]:
        assert store(a, entry)
    assert a.flush(30)
    assert not b.contains(blocks[0].key)  # b knows nothing until it asks
    assert b.find_chain(ROOT_A, [e.key for e in blocks]) == 4
    assert [b.get(e.key).token_ids for e in blocks] == [e.token_ids for e in blocks]
    (child,) = b.children(blocks[-1].key)
    assert (child.key, child.is_tail, child.has_logits, child.token_ids) == (tail.key, True, True, (7, 7))
    loaded = b.prepare_load([e.key for e in [*blocks, tail]])
    assert [e.payload for e in loaded[:4]] == [payload_for(e.key) for e in blocks]
    assert loaded[4].payload == tail.payload and loaded[4].namespace == ROOT_A
    stats = a.stats().counters
    assert stats["num_written"] == 5 and stats["num_dropped"] == 0
    assert b.stats().counters["num_loads"] == 5


def test_a_chain_is_answered_in_one_round_trip_and_stops_at_the_first_missing_block(pair, monkeypatch):
    """A spy on redis-py's pipeline counts round trips; the server is real."""
    a, b = pair
    blocks = chain(list(range(1, 41)))  # ten blocks
    for entry in blocks[:6]:
        store(a, entry)
    assert a.flush(30)
    trips = []
    execute = redis.client.Pipeline.execute
    monkeypatch.setattr(redis.client.Pipeline, "execute", lambda self, *args, **kw: trips.append(len(self)) or execute(self, *args, **kw))
    assert b.find_chain(ROOT_A, [e.key for e in blocks]) == 6
    assert trips == [10]
    assert b.prepare_load([e.key for e in blocks[:6]])
    assert trips == [10, 6]


def test_namespaces_never_share(pair):
    a, b = pair
    stored_chain(a, TOKENS, root=ROOT_A)
    assert b.find_chain(ROOT_B, [e.key for e in chain(TOKENS, root=ROOT_B)]) == 0
    assert b.children(ROOT_B) == []


def test_a_corrupt_or_truncated_value_is_a_counted_miss_and_is_deleted(pair, redis_server):
    a, b = pair
    blocks = stored_chain(a, TOKENS)
    client = redis_server.client()
    name = entry_key("kvcellar:", blocks[1].key)
    value = bytearray(client.get(name))
    value[-3] ^= 0x01  # one flipped bit inside a tensor
    client.set(name, bytes(value))
    truncated = entry_key("kvcellar:", blocks[2].key)
    client.set(truncated, client.get(truncated)[:-10])
    assert b.find_chain(ROOT_A, [e.key for e in blocks]) == 4
    assert b.prepare_load([blocks[0].key])[0].payload == payload_for(blocks[0].key)
    for entry in blocks[1:3]:
        with pytest.raises(KeyError, match="failed its checks"):
            b.prepare_load([entry.key])
    assert b.stats().counters["num_corrupt"] == 2
    assert b.flush(30)
    assert client.exists(name, truncated) == 0
    assert client.hexists(children_key("kvcellar:", blocks[0].key), blocks[1].key.hex()) == 0
    assert b.find_chain(ROOT_A, [e.key for e in blocks]) == 1


def test_an_entry_evicted_by_the_server_is_a_counted_miss(pair, redis_server):
    a, b = pair
    blocks = stored_chain(a, TOKENS)
    assert b.find_chain(ROOT_A, [e.key for e in blocks]) == 4
    redis_server.client().delete(entry_key("kvcellar:", blocks[3].key))  # the record stays, as allkeys-lru may leave it
    with pytest.raises(KeyError, match="gone"):
        b.prepare_load([blocks[3].key])
    assert b.stats().counters["num_missing"] == 1
    assert not b.contains(blocks[3].key)


def test_a_server_down_at_start_is_served_around_and_joined_when_it_comes_up(tmp_path, wait_for):
    server = RedisServer(tmp_path / "redis")  # not started yet
    tier = open_remote(server, timeout_s=0.2)
    try:
        blocks = chain(TOKENS)
        assert not tier.is_up
        assert tier.find_chain(ROOT_A, [e.key for e in blocks]) == 0
        assert not store(tier, blocks[0])
        assert tier.stats().counters["num_dropped_unavailable"] == 1
        server.start()
        wait_for(lambda: tier.is_up, "the tier to reconnect", 60)
        assert store(tier, blocks[0]) and tier.flush(30)
        assert tier.stats().counters["num_reconnects"] == 1
        assert server.client().exists(entry_key("kvcellar:", blocks[0].key)) == 1
    finally:
        tier.close()
        server.stop()


def test_a_server_killed_and_restarted_mid_run_costs_misses_not_errors(pair, redis_server, wait_for, monkeypatch):
    a, b = pair
    blocks = stored_chain(a, TOKENS)
    redis_server.kill()
    assert b.find_chain(ROOT_A, [e.key for e in blocks]) == 0  # a connection error: the link goes down
    assert not b.is_up
    with pytest.raises(KeyError):
        b.prepare_load([blocks[0].key])
    with no_network(monkeypatch):  # down: answered without trying the server
        assert b.find_chain(ROOT_A, [e.key for e in blocks]) == 0
        assert not store(b, blocks[0])
    redis_server.start()  # the same port, empty (no persistence)
    wait_for(lambda: b.is_up, "the tier to reconnect", 60)
    assert b.find_chain(ROOT_A, [e.key for e in blocks]) == 0  # the restarted server holds nothing
    wait_for(lambda: a.is_up or a.find_chain(ROOT_A, [blocks[0].key]) >= 0 and a.is_up, "a to reconnect", 60)
    counters = b.stats().counters
    assert counters["num_connection_errors"] >= 1 and counters["num_reconnects"] == 1


def test_a_server_that_stops_answering_costs_at_most_the_timeout(pair, redis_server, wait_for, monkeypatch):
    a, _ = pair
    tier = open_remote(redis_server, timeout_s=0.3)
    try:
        blocks = chain(TOKENS)
        os.kill(redis_server.process.pid, signal.SIGSTOP)
        try:
            assert tier.find_chain(ROOT_A, [e.key for e in blocks]) == 0  # one exchange, cut at the timeout
            assert tier.stats().counters["num_timeouts"] >= 1  # the background info read may time out too
            with no_network(monkeypatch):  # down now: no second wait
                assert tier.find_chain(ROOT_A, [e.key for e in blocks]) == 0
                with pytest.raises(KeyError):
                    tier.prepare_load([blocks[0].key])
        finally:
            os.kill(redis_server.process.pid, signal.SIGCONT)
        wait_for(lambda: tier.is_up, "the tier to reconnect", 60)
    finally:
        tier.close()


def store_padded(tier: RemoteTier, num_blocks: int) -> list:
    """`num_blocks` chained blocks of about 10 KB each, stored and flushed."""
    blocks = chain(list(range(1, 4 * num_blocks + 1)))
    for entry in blocks:
        entry.payload = {**entry.payload, "pad": bytes(8192)}
        store(tier, entry)
    assert tier.flush(60)
    return blocks


def test_a_full_server_refuses_writes_which_are_counted_drops(tmp_path):
    server = RedisServer(tmp_path / "redis", maxmemory="2mb", policy="noeviction").start()
    tier = open_remote(server)
    try:
        blocks = store_padded(tier, 400)  # 4 MB: past the 2 MB maxmemory
        counters = tier.stats().counters
        assert counters["num_oom"] >= 1
        assert counters["num_written"] + counters["num_dropped"] == len(blocks)
        assert 0 < counters["num_written"] < len(blocks)
        found = tier.find_chain(ROOT_A, [e.key for e in blocks])
        assert found <= counters["num_written"]
        assert [e.payload for e in tier.prepare_load([e.key for e in blocks[:found]])] == [e.payload for e in blocks[:found]]
    finally:
        tier.close()
        server.stop()


def test_under_allkeys_lru_the_oldest_entries_go_and_their_loads_are_misses(tmp_path):
    server = RedisServer(tmp_path / "redis", maxmemory="4mb", policy="allkeys-lru").start()
    tier = open_remote(server)
    try:
        blocks = store_padded(tier, 600)  # 6 MB: past the 4 MB maxmemory
        counters = tier.stats().counters
        assert counters["num_written"] == len(blocks) and counters["num_oom"] == 0
        client = server.client()
        assert client.info("stats")["evicted_keys"] > 0
        gone = next(e for e in blocks if not client.exists(entry_key("kvcellar:", e.key)))
        with pytest.raises(KeyError):
            tier.prepare_load([gone.key])
        assert tier.stats().counters["num_missing"] == 1
    finally:
        tier.close()
        server.stop()


def test_close_sends_every_accepted_write(redis_server):
    tier = open_remote(redis_server)
    blocks = chain(list(range(1, 4 * 50 + 1)))
    tier.defer_writes(True)  # held back as during a prefill: close must still send them
    assert all(store(tier, entry) for entry in blocks)
    tier.close(timeout_s=60)
    client = redis_server.client()
    assert all(client.exists(entry_key("kvcellar:", e.key)) for e in blocks)


def test_clear_removes_only_this_prefix(redis_server):
    tier = open_remote(redis_server, prefix="team-a:")
    other = open_remote(redis_server, prefix="team-b:")
    try:
        for entry in chain(TOKENS):
            store(tier, entry)
            store(other, entry)
        assert tier.flush(30) and other.flush(30)
        tier.clear()
        assert tier.flush(30)
        client = redis_server.client()
        assert list(client.scan_iter(match="team-a:*")) == []
        assert len(list(client.scan_iter(match="team-b:*"))) == 8  # four entries and four records
    finally:
        tier.close()
        other.close()


def test_its_budget_is_the_servers_maxmemory(tmp_path, wait_for):
    server = RedisServer(tmp_path / "redis", maxmemory="64mb").start()
    tier = open_remote(server)
    try:
        wait_for(lambda: tier.budget_bytes == 64 << 20, "the server's maxmemory to be read", 30)
        with pytest.raises(ValueError, match="maxmemory"):
            tier.set_budget(1 << 20)
    finally:
        tier.close()
        server.stop()


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379", "redis://127.0.0.1:notaport", "unix://", "redis:///0"])
def test_a_malformed_url_is_refused_with_the_forms_that_work(url):
    with pytest.raises(ValueError, match="remote cache URL"):
        RemoteTier(url, RawCodec())


def test_a_password_never_appears_in_what_is_shown(tmp_path):
    tier = RemoteTier(f"redis://user:s3cret@127.0.0.1:1/0", RawCodec(), timeout_s=0.2)
    try:
        assert "s3cret" not in tier.address.display and "***" in tier.address.display
    finally:
        tier.close()


def test_priority_and_kind_survive_the_trip(pair):
    a, b = pair
    (block,) = chain([1, 2, 3, 4], priority=Priority.SYSTEM)
    store(a, block)
    assert a.flush(30)
    assert b.find_chain(ROOT_A, [block.key]) == 1
    (loaded,) = b.prepare_load([block.key])
    assert (loaded.priority, loaded.is_tail, loaded.parent) == (Priority.SYSTEM, False, ROOT_A)


@pytest.mark.parametrize(("options", "message"), [
    ({"remote_cache": "http://127.0.0.1:6379"}, "redis://"),
    ({"remote_cache": "redis://127.0.0.1:6379/0", "remote_timeout_s": 0}, "remote_timeout_s"),
    ({"remote_key_prefix": "a*"}, "remote_key_prefix"),
    ({"remote_write_queue_bytes": 0}, "remote_write_queue_bytes"),
])  # fmt: skip
def test_the_cache_config_refuses_unusable_remote_settings(options, message):
    from kvcellar.config import CacheConfig

    with pytest.raises(ValueError, match=message):
        CacheConfig(**options)
