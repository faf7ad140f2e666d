"""What each key reads: a tenant key its own namespace's figures, an admin key everyone's;
/metrics needs an admin key unless the server runs with --metrics-public; auth failures are counted."""

from __future__ import annotations

import pytest
import requests

from .support import long_text
from .test_records import rejected_counts

ADMIN, TENANT_A, TENANT_B = "admin-key", "key-a", "key-b"
TENANT_KEYS = ("--api-key", ADMIN, "--api-key", f"{TENANT_A}:salt-a", "--api-key", f"{TENANT_B}:salt-b")


@pytest.fixture(scope="module")
def keyed(start_server):
    return start_server(*TENANT_KEYS, admin_key=ADMIN)


@pytest.fixture(scope="module")
def used(keyed):
    """Tenant a: one chat twice (the second hits), under its own salt and a sub-salt; tenant b: one completion."""
    messages = [{"role": "user", "content": long_text("tenant a's conversation", 30)}]
    client_a, client_b = keyed.client(key=TENANT_A), keyed.client(key=TENANT_B)
    replies_a = [client_a.chat.completions.create(model=keyed.model, messages=messages, max_tokens=2) for _ in range(2)]
    replies_a.append(client_a.chat.completions.create(model=keyed.model, messages=messages, max_tokens=2,
                                                      extra_body={"cache_salt": "drafts"}))  # fmt: skip
    reply_b = client_b.completions.create(model=keyed.model, prompt=long_text("tenant b's prompt", 20), max_tokens=3)
    return replies_a, reply_b


def _stats(server, key: str, **params) -> dict:
    response = server.get("/v1/cache/stats", key=key, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_tenant_sees_its_own_requests_hits_and_entries(keyed, used):
    replies_a, reply_b = used
    a, b = _stats(keyed, TENANT_A), _stats(keyed, TENANT_B)
    assert a["scope"] == b["scope"] == "tenant"
    assert (a["requests"], a["lookups"], b["requests"], b["lookups"]) == (3, 3, 1, 1)
    prompt_a = replies_a[0].usage.prompt_tokens
    cached_a = sum(r.usage.prompt_tokens_details.cached_tokens for r in replies_a)
    assert cached_a == replies_a[1].usage.prompt_tokens_details.cached_tokens > 0  # the sub-salt started cold
    assert (a["hit_tokens"], a["miss_tokens"], a["saved_tokens"]) == (cached_a, 3 * prompt_a - cached_a, cached_a)
    assert (b["hit_tokens"], b["miss_tokens"]) == (0, reply_b.usage.prompt_tokens)
    assert a["completion_tokens"] == sum(r.usage.completion_tokens for r in replies_a)
    assert b["completion_tokens"] == reply_b.usage.completion_tokens
    everyone = _stats(keyed, ADMIN)
    assert everyone["scope"] == "global" and everyone["requests"] == 4 and everyone["lookups"] == 4
    # Entries: each tenant counts its own namespaces' (a: two salts); nobody else stored any.
    assert a["entries"] > 0 and b["entries"] > 0
    assert a["entries"] + b["entries"] == everyone["entries"]
    assert a["tiers"]["device"]["entries"] == a["entries"]
    assert a["tiers"]["device"]["budget_bytes"] == everyone["tiers"]["device"]["budget_bytes"]
    assert sum(p["entries"] for p in a["by_priority"].values()) == a["entries"]
    assert a["hit_tokens_by_tier"] == {"device": cached_a}


def test_a_tenant_sees_no_shared_figures(keyed, used):
    a = _stats(keyed, TENANT_A, history="true")
    assert "evictions" not in a and "tenants" not in a and "discards" not in a
    assert set(a["tiers"]["device"]) == {"bytes", "budget_bytes", "entries"}
    assert all("evictions" not in window and window["requests"] == 3 for window in a["windows"].values())
    assert a["history"] and all("evictions" not in snapshot for snapshot in a["history"])


def test_metrics_need_an_admin_key_and_count_the_refusals(keyed, used):
    before = rejected_counts(keyed.get("/metrics", key=ADMIN).text)
    for key, status, code in [(TENANT_A, 403, "admin_only"), (None, 401, "missing_api_key"), ("wrong", 401, "invalid_api_key")]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        response = requests.get(keyed.base_url + "/metrics", headers=headers, timeout=30)
        assert response.status_code == status
        assert response.json()["error"]["code"] == code
    assert requests.get(keyed.base_url + "/v1/cache/stats", timeout=30).status_code == 401
    after = rejected_counts(keyed.get("/metrics", key=ADMIN).text)
    assert {s: after[s] - before.get(s, 0) for s in after} == {"401": 3, "403": 1}


def test_metrics_public_opens_only_metrics(start_server):
    public = start_server(*TENANT_KEYS, "--metrics-public", admin_key=ADMIN)
    for headers in ({}, {"Authorization": f"Bearer {TENANT_A}"}):
        response = requests.get(public.base_url + "/metrics", headers=headers, timeout=30)
        assert response.status_code == 200 and "kvcellar_cache_lookups_total" in response.text
    assert requests.get(public.base_url + "/v1/cache/stats", timeout=30).status_code == 401
    assert _stats(public, TENANT_A)["scope"] == "tenant"
