"""Many clients at once: every stream gets exactly its sequential greedy answer; a client that leaves is cancelled."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import requests

from .support import long_text
from .support import metric as _metric

NUM_CLIENTS = 32


def _stream_text(client, model: str, messages: list[dict]) -> tuple[str, str]:
    chunks = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0, stream=True)
    parts, finish = [], None
    for chunk in chunks:
        parts.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    return "".join(parts), finish


def test_thirty_two_concurrent_streams_equal_sequential_greedy_runs(server, unique):
    client = server.client()
    conversations = [[{"role": "user", "content": long_text(f"client {i} {unique}", 6 + i)}] for i in range(NUM_CLIENTS)]
    sequential = []
    for messages in conversations:
        reply = client.chat.completions.create(model=server.model, messages=messages, max_tokens=16, temperature=0)
        sequential.append((reply.choices[0].message.content, reply.choices[0].finish_reason))

    server.post("/v1/cache/clear", {})  # the concurrent runs start cold, as the sequential ones did
    with ThreadPoolExecutor(NUM_CLIENTS) as pool:  # one client per thread, as separate users would be
        futures = [pool.submit(_stream_text, server.client(), server.model, messages) for messages in conversations]
        concurrent = [future.result(timeout=120) for future in futures]
    assert concurrent == sequential
    assert server.get("/health").json()["queue_depth"] == 0


def test_a_client_that_disconnects_cancels_its_generation(server, unique, wait_for):
    body = {"model": server.model, "prompt": long_text(unique, 8), "max_tokens": 2000, "ignore_eos": True,
            "temperature": 0, "stream": True}  # fmt: skip
    with requests.Session() as session:  # closing the session closes the socket: the client is gone
        response = session.post(server.base_url + "/v1/completions", json=body, stream=True, timeout=30)
        lines = response.iter_lines(decode_unicode=True)
        received = [line for _, line in zip(range(6), lines)]  # a few events, then hang up
        response.close()
    assert any(line.startswith("data: ") for line in received)

    def cancelled() -> dict | None:
        records = server.get("/v1/requests/recent", params={"limit": 20}).json()["data"]
        return next((r for r in records if r["num_prompt_tokens"] and r["finish_reason"] == "cancelled"
                     and r["endpoint"] == "completions" and r["stream"]), None)  # fmt: skip

    record = wait_for(cancelled, "the disconnected stream to be recorded as cancelled", 120)
    # Stopped, not run to its end: the ~2000 abandoned tokens were never decoded, and nothing runs any more.
    assert record["num_completion_tokens"] < 2000
    health = server.get("/health").json()
    assert (health["running"], health["queue_depth"]) == (0, 0)
    reply = server.client().completions.create(model=server.model, prompt="x", max_tokens=2)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_health_and_metrics_show_the_requests_running_together(server, unique):
    before = server.get("/metrics").text
    body = {"model": server.model, "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True}
    with requests.Session() as first, requests.Session() as second:
        responses = [session.post(server.base_url + "/v1/completions", json={**body, "prompt": long_text(f"{unique} {i}", 4)},
                                  stream=True, timeout=30) for i, session in enumerate((first, second))]  # fmt: skip
        streams = [(line for line in response.iter_lines(decode_unicode=True) if line) for response in responses]
        for stream in streams:  # both are decoding now
            for _ in range(3):
                next(stream)
        health = server.get("/health").json()
        metrics = server.get("/metrics").text
        for response in responses:
            response.close()
    assert health["running"] == 2 and health["kv_tokens"] > 0 and health["kv_budget_tokens"] >= health["kv_tokens"]
    # The two decoded in shared passes: passes of two requests were counted while both streamed.
    two = 'kvcellar_decode_batch_size_bucket{le="2.0"}'
    one = 'kvcellar_decode_batch_size_bucket{le="1.0"}'
    assert _metric(metrics, two) - _metric(metrics, one) > _metric(before, two) - _metric(before, one)
    assert _metric(metrics, "kvcellar_running_requests") == 2
    assert _metric(metrics, "kvcellar_kv_budget_tokens") == health["kv_budget_tokens"]
    assert _metric(metrics, "kvcellar_preemptions_total") == 0
