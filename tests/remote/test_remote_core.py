"""The cache core over a memory tier and a remote tier on a real redis-server: two cores stand for two servers.

A spy on redis-py's pipelines and commands counts round trips (the server is real): a lookup asks the remote tier once,
about the part of the chain no local tier holds, and not at all when the local tiers hold it all.
"""

from __future__ import annotations

import threading

import pytest
import redis

from kvcellar.cache import LayoutCapabilities, PrefixCache, Priority
from kvcellar.tiers.codec import RawCodec
from kvcellar.tiers.memory import MemoryTier
from kvcellar.tiers.remote.tier import RemoteTier
from tests.tiers.helpers import B, ROOT_A, payload_for

CAPABILITIES = LayoutCapabilities(block_size=B, has_recurrent=False, sliding_window=None)
TOKENS = list(range(100, 100 + 6 * B))  # six blocks


def core(server) -> PrefixCache:
    tiers = [MemoryTier(1 << 20, name="device"), RemoteTier(server.url, RawCodec(), timeout_s=2.0)]
    return PrefixCache(ROOT_A, CAPABILITIES, tiers, write_through=["remote"])


def insert_chain(cache: PrefixCache, tokens: list[int]) -> list[bytes]:
    keys, parent = [], cache.root
    for key, start in zip(cache.block_keys(tokens), range(0, len(tokens), B)):
        block = tokens[start : start + B]
        payload = payload_for(key)
        assert cache.insert_block(parent, block, payload, sum(map(len, payload.values())), Priority.USER, key=key)
        keys.append(parent := key)
    return keys


@pytest.fixture
def trips(monkeypatch):
    """Round trips a lookup makes (on the test's thread; the writers' threads are not counted): a pipeline's
    length, or the name of a single command."""
    counted: list[object] = []
    execute = redis.client.Pipeline.execute
    command = redis.Redis.execute_command
    mine = threading.get_ident()

    def note(what: object) -> None:
        if threading.get_ident() == mine:
            counted.append(what)

    monkeypatch.setattr(redis.client.Pipeline, "execute",
                        lambda self, *args, **kw: note(len(self)) or execute(self, *args, **kw))  # fmt: skip
    monkeypatch.setattr(redis.Redis, "execute_command",
                        lambda self, *args, **kw: note(args[0]) or command(self, *args, **kw))  # fmt: skip
    yield counted
    monkeypatch.undo()


def test_a_second_core_restores_what_the_first_inserted(redis_server, trips):
    a, b = core(redis_server), core(redis_server)
    keys = insert_chain(a, TOKENS)
    assert a.tiers[1].flush(30)
    trips.clear()
    match = b.lookup([*TOKENS, 1])
    assert match.num_tokens == len(TOKENS) and match.tokens_by_tier == {"remote": len(TOKENS)}
    assert [match.payload_of(e) for e in match.blocks] == [payload_for(k) for k in keys]
    assert trips == [6, "HGETALL", 6]  # the chain's six records, the children of its end, the six entries
    b.release(match)
    trips.clear()
    again = b.lookup([*TOKENS, 1])  # promoted into b's memory tier: no round trip at all
    assert again.tokens_by_tier == {"device": len(TOKENS)} and trips == ["HGETALL"]  # no local child: asked
    b.release(again)


def test_the_remote_tier_is_asked_only_about_what_the_memory_tier_lacks(redis_server, trips):
    a, b = core(redis_server), core(redis_server)
    insert_chain(a, TOKENS)
    insert_chain(b, TOKENS[: 2 * B])  # b computed the first two blocks itself
    assert a.tiers[1].flush(30) and b.tiers[1].flush(30)
    trips.clear()
    match = b.lookup([*TOKENS, 1])
    assert match.tokens_by_tier == {"device": 2 * B, "remote": 4 * B}
    assert trips == [4, "HGETALL", 4]  # four records asked, the children of the chain's end, four entries fetched
    b.release(match)
