"""A chat turn that parts from its previous turn's tokens records where (request record, dashboard, counter):
the tracker on fake token streams, then a served conversation whose client rewrites an earlier message."""

from __future__ import annotations

import re

import requests

from kvcellar.server.reuse_breaks import TurnTracker

SERIES = re.compile(r'^kvcellar_chat_reuse_breaks_total\{endpoint="chat.completions"\} (\S+)$', re.MULTILINE)


def _decode(ids: list[int]) -> str:
    return " ".join(map(str, ids))


def test_tracker_reports_a_rewritten_history_and_not_a_grown_one():
    tracker = TurnTracker(num_conversations=4)
    assert tracker.observe("", [1, 2, 3, 4, 5], [6, 7], 2, _decode) is None  # first turn: nothing to compare
    assert tracker.observe("", [1, 2, 3, 4, 5, 6, 7, 8, 9], [10], 2, _decode) is None  # grew: all reused
    found = tracker.observe("", [1, 2, 3, 99, 5, 6, 7, 8, 9, 10, 11], [12], 2, _decode)
    assert (found.position, found.offered_tokens) == (3, 10)
    assert found.previous.startswith("4 5 6") and found.now.startswith("99 5 6")
    assert tracker.observe("", [1, 2, 50, 51], [], 2, _decode) is None  # shares only the system prompt: another chat
    assert tracker.observe("other-salt", [1, 2, 3, 99, 0], [], 2, _decode) is None  # salts never meet


def test_a_served_turn_that_rewrites_an_earlier_message_is_recorded(server, unique):
    client = server.client()
    system = {"role": "system", "content": f"You are terse. {unique}"}
    first = client.chat.completions.create(model=server.model, messages=[system, {"role": "user", "content": "Plan a trip."}],
                                           max_tokens=4, temperature=0)  # fmt: skip
    assert _newest(server)["reuse_break"] is None
    before = _breaks(server)
    rewritten = [system, {"role": "user", "content": "Plan a trip. (Reminder: be brief.)"},
                 {"role": "assistant", "content": first.choices[0].message.content}, {"role": "user", "content": "Go on."}]
    client.chat.completions.create(model=server.model, messages=rewritten, max_tokens=4, temperature=0)
    found = _newest(server)["reuse_break"]
    assert found is not None and "Reminder" in found["now"] and "Reminder" not in found["previous"]
    assert found["position"] < first.usage.prompt_tokens <= found["offered_tokens"]
    assert _breaks(server) == before + 1


def _newest(server) -> dict:
    response = requests.get(server.base_url + "/v1/requests/recent?limit=1", headers=server.headers(None), timeout=30)
    return response.json()["data"][0]


def _breaks(server) -> float:
    """The counter's chat series; absent until the first break."""
    match = SERIES.search(server.get("/metrics").text)
    return float(match.group(1)) if match else 0.0
