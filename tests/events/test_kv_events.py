"""KV events on a real ZMQ socket, decoded with vLLM 0.32's own event types (msgspec), from a real engine."""

from __future__ import annotations

import pytest
import zmq

from kvcellar import CacheConfig, Engine, EngineConfig
from tests.events.vllm_types import DECODER, AllBlocksCleared, BlockRemoved, BlockStored
from tests.remote.redis_server import free_port

B = 16


class Subscriber:
    """Binds on loopback; the engine's publisher connects to it (an endpoint without * is connected to)."""

    def __init__(self, endpoint: str) -> None:
        self.socket = zmq.Context.instance().socket(zmq.SUB)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.bind(endpoint)
        self.sequences: list[int] = []

    def batches(self, timeout_ms: int):
        while self.socket.poll(timeout_ms):
            topic, sequence, payload = self.socket.recv_multipart()
            self.sequences.append(int.from_bytes(sequence, "big"))
            yield DECODER.decode(payload)

    def events(self, timeout_ms: int = 500) -> list:
        return [event for batch in self.batches(timeout_ms) for event in batch.events]

    def close(self) -> None:
        self.socket.close(linger=0)


@pytest.fixture
def published(tiny_model_dirs, tmp_path, wait_for):
    """(engine, subscriber) with the subscription live: a clear was published and received."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    subscriber = Subscriber(endpoint)
    engine = Engine(EngineConfig(str(tiny_model_dirs["qwen3"]), device="cpu", block_size=B, num_threads=1,
                                 cache=CacheConfig(cache_dir=str(tmp_path / "kv"), kv_events_endpoint=endpoint,
                                                   device_cache_bytes=1 << 30)))  # fmt: skip

    def live() -> bool:  # a PUB drops what it sends before a subscription arrives: send until one is seen
        engine.clear_cache()
        return any(isinstance(e, AllBlocksCleared) for e in subscriber.events(100))

    wait_for(live, "the subscription to reach the publisher", 60)
    subscriber.events(200)  # drain the clears sent meanwhile
    yield engine, subscriber
    subscriber.close()
    engine.close()


def test_each_prompt_block_is_published_once_per_medium_with_its_tokens_and_parent(published):
    engine, subscriber = published
    prompt = list(range(30, 30 + 3 * B + 5))
    engine.generate(prompt_ids=prompt, max_tokens=2)
    engine.cache_registry.flush(60)
    stored = [e for e in subscriber.events() if isinstance(e, BlockStored)]
    by_medium = {medium: [e for e in stored if e.medium == medium] for medium in ("CPU", "STORAGE")}
    for medium, events in by_medium.items():
        assert [e.token_ids for e in events] == [prompt[i * B : (i + 1) * B] for i in range(3)], medium
        assert [e.block_size for e in events] == [B] * 3
        assert events[0].parent_block_hash is None
        assert [e.parent_block_hash for e in events[1:]] == [e.block_hashes[0] for e in events[:2]]
        assert all(len(e.block_hashes) == 1 and len(e.block_hashes[0]) == 32 for e in events)
    assert subscriber.sequences == sorted(subscriber.sequences)


def test_evictions_and_clears_are_published(published, wait_for):
    engine, subscriber = published
    prompt = list(range(60, 60 + 4 * B))
    engine.generate(prompt_ids=prompt, max_tokens=2)
    engine.cache_registry.flush(60)
    stored = [e for e in subscriber.events() if isinstance(e, BlockStored) and e.medium == "CPU"]
    engine.set_cache_budget("device", 0)  # every block leaves memory (it stays on disk)
    removed = [e for e in subscriber.events() if isinstance(e, BlockRemoved)]
    assert {h for e in removed if e.medium == "CPU" for h in e.block_hashes} >= {e.block_hashes[0] for e in stored}
    engine.clear_cache()
    assert any(isinstance(e, AllBlocksCleared) for e in subscriber.events())


def test_a_bad_endpoint_is_a_clear_error():
    with pytest.raises(ValueError, match="ZMQ address"):
        CacheConfig(kv_events_endpoint="localhost:5557")
