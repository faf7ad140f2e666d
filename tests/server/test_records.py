"""What /v1/requests/recent and /metrics record: what really happened to each request.

A stream cancelled after some tokens keeps its measured cached / prefilled tokens and TTFT; a request
queued behind another counts its wait in `queue_s` and in the client's TTFT; the list is in strict
completion order; chat requests cache their system prompt at SYSTEM priority; every 4xx / 5xx answer
is counted by status.
"""

from __future__ import annotations

import math
import re
import threading
import time

import pytest
import requests

from kvcellar.engine.prompt import encode_chat

from .support import long_text

WAIT_S = 60.0  # bounds a hang only; every wait below is on a condition


def _record(server, request_id: str | None = None, match=None) -> dict | None:
    records = server.get("/v1/requests/recent", params={"limit": 1000}).json()["data"]
    return next((r for r in records if (match(r) if match else r["request_id"] == request_id)), None)


@pytest.fixture(scope="module")
def fresh(start_server):
    """A server of its own: exact counts of entries and rejections."""
    return start_server()


def test_a_stream_cancelled_after_some_tokens_keeps_what_was_measured(server, unique, wait_for):
    prompt = long_text(f"cancelled stream {unique}", 40)
    warm = server.client().completions.create(model=server.model, prompt=prompt, max_tokens=1)
    num_prompt = warm.usage.prompt_tokens
    cached_now = server.post("/v1/cache/probe", {"prompt": prompt}).json()["cached_tokens"]
    assert cached_now > 0
    body = {"model": server.model, "prompt": prompt, "max_tokens": 1500, "ignore_eos": True, "temperature": 0,
            "stream": True}  # fmt: skip
    with requests.Session() as session:
        response = session.post(server.base_url + "/v1/completions", json=body, stream=True, timeout=30)
        events = [line for _, line in zip(range(20), (x for x in response.iter_lines(decode_unicode=True) if x))]
        response.close()
    assert len(events) == 20 and all(line.startswith("data: ") for line in events)

    record = wait_for(lambda: _record(server, match=lambda r: r["finish_reason"] == "cancelled" and r["stream"]
                                       and r["num_prompt_tokens"] == num_prompt and r["created_s"] > warm.created - 1),
                      "the cancelled stream's record", WAIT_S)  # fmt: skip
    assert record["num_cached_tokens"] == cached_now
    assert record["num_prefilled_tokens"] == num_prompt - cached_now
    assert 20 <= record["num_completion_tokens"] < 1500  # at least what this client received
    assert record["engine_ttft_s"] is not None and record["ttft_s"] is not None
    assert record["ttft_s"] == pytest.approx(record["queue_s"] + record["engine_ttft_s"])
    assert record["total_s"] >= record["ttft_s"] >= record["queue_s"] > 0


def test_a_request_arriving_while_another_decodes_runs_beside_it(server, unique, wait_for):
    long_body = {"model": server.model, "prompt": long_text(f"holds the model {unique}", 8), "max_tokens": 2000,
                 "ignore_eos": True, "temperature": 0, "stream": True}  # fmt: skip
    replies: list = []
    started = time.time()
    with requests.Session() as session:
        response = session.post(server.base_url + "/v1/completions", json=long_body, stream=True, timeout=30)
        lines = (x for x in response.iter_lines(decode_unicode=True) if x)
        next(lines)  # the long request is decoding now
        short = threading.Thread(target=lambda: replies.append(server.client().completions.create(
            model=server.model, prompt=f"beside it {unique}", max_tokens=2)))  # fmt: skip
        short.start()
        short.join(WAIT_S)
        response.close()  # the long one is still running: had they taken turns, it would have ended first
    assert replies, "the second request got no answer"
    record = _record(server, replies[0].id)  # recorded before its answer was sent

    def long_record():
        records = server.get("/v1/requests/recent", params={"limit": 50}).json()["data"]
        return next((r for r in records if r["endpoint"] == "completions" and r["stream"] and r["created_s"] >= started
                     and r["request_id"] != replies[0].id), None)  # fmt: skip

    ended = wait_for(long_record, "the long request's record", WAIT_S)
    assert ended["finish_reason"] == "cancelled" and ended["num_completion_tokens"] < 2000
    assert record["ttft_s"] == pytest.approx(record["queue_s"] + record["engine_ttft_s"])
    assert record["num_completion_tokens"] == 2


def test_recent_requests_are_newest_first_by_completion_order(server, unique):
    client = server.client()
    ids = [client.completions.create(model=server.model, prompt=f"order {unique} {i}", max_tokens=1).id for i in range(4)]
    records = server.get("/v1/requests/recent", params={"limit": 1000}).json()["data"]
    seqs = [r["seq"] for r in records]
    assert seqs == sorted(seqs, reverse=True) and len(set(seqs)) == len(seqs)
    mine = [r["request_id"] for r in records if r["request_id"] in ids]
    assert mine == ids[::-1]


def test_a_chat_caches_its_system_prompt_at_system_priority(fresh, server_model_dir, unique):
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": long_text(f"system prompt {unique}", 60)},
                {"role": "user", "content": long_text("a question", 20)}]  # fmt: skip
    ids, segments = encode_chat(AutoTokenizer.from_pretrained(server_model_dir), messages)
    fresh.client().chat.completions.create(model=fresh.model, messages=messages, max_tokens=1)
    by_priority = fresh.get("/v1/cache/stats").json()["by_priority"]
    # Blocks of 16 (support.py); the server's default is exact mode: no checkpoint at the system prompt's end.
    assert by_priority["SYSTEM"]["entries"] == math.ceil(segments.system_end / 16) > 0
    assert by_priority["USER"]["entries"] > 0


def rejected_counts(text: str) -> dict[str, float]:
    """status -> kvcellar_requests_rejected_total from a /metrics text."""
    pattern = r'^kvcellar_requests_rejected_total\{status="(\d+)"\} (\S+)$'
    return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text, re.MULTILINE)}


def test_every_4xx_answer_is_counted_by_status(fresh):
    before = rejected_counts(fresh.get("/metrics").text)
    assert fresh.post("/v1/completions", {"model": fresh.model, "prompt": "x", "max_tokens": 0}).status_code == 400
    assert requests.post(fresh.base_url + "/v1/completions", data=b"{not json", timeout=30,
                         headers={"Content-Type": "application/json"}).status_code == 400  # fmt: skip
    assert fresh.get("/v1/no-such-endpoint").status_code == 404
    assert fresh.post("/v1/completions", {"model": "other", "prompt": "x"}).status_code == 404
    assert requests.put(fresh.base_url + "/v1/models", timeout=30).status_code == 405
    after = rejected_counts(fresh.get("/metrics").text)
    assert {status: after.get(status, 0) - before.get(status, 0) for status in after} == {"400": 2, "404": 2, "405": 1}


def _series(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_time_histograms_count_every_request_from_its_arrival(fresh, unique):
    names = [f'kvcellar_{h}_seconds_{part}{{endpoint="completions"}}' for h in ("queue", "ttft", "engine_ttft", "request")
             for part in ("count", "sum")]  # fmt: skip
    before = {name: _series(fresh.get("/metrics").text, name) for name in names}
    for i in range(2):
        fresh.client().completions.create(model=fresh.model, prompt=f"histograms {unique} {i}", max_tokens=2)
    text = fresh.get("/metrics").text  # a request is recorded before its answer is sent
    delta = {name.split("{")[0].removeprefix("kvcellar_"): _series(text, name) - before[name] for name in names}
    assert {name: value for name, value in delta.items() if name.endswith("_count")} == {
        "queue_seconds_count": 2, "ttft_seconds_count": 2, "engine_ttft_seconds_count": 2, "request_seconds_count": 2}
    assert delta["ttft_seconds_sum"] == pytest.approx(delta["queue_seconds_sum"] + delta["engine_ttft_seconds_sum"])
    assert delta["request_seconds_sum"] >= delta["ttft_seconds_sum"] > delta["engine_ttft_seconds_sum"] > 0
