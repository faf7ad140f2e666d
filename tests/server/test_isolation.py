"""Tenant isolation: API keys are enforced; salts (per request, or bound to a key) never share cache entries."""

from __future__ import annotations

import openai
import pytest
import requests

from .support import long_text

ADMIN, TENANT_A, TENANT_B = "admin-key", "key-a", "key-b"
ENDPOINTS = [
    ("GET", "/health"), ("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/v1/cache/stats"),
    ("GET", "/v1/requests/recent"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
    ("POST", "/v1/cache/probe"), ("POST", "/v1/cache/clear"), ("POST", "/v1/cache/budget"),
]  # fmt: skip


@pytest.fixture(scope="module")
def keyed(start_server):
    return start_server("--api-key", ADMIN, "--api-key", f"{TENANT_A}:salt-a", "--api-key", f"{TENANT_B}:salt-b",
                        admin_key=ADMIN)  # fmt: skip


def _call(server, method: str, path: str, key: str | None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.request(method, server.base_url + path, headers=headers, json={} if method == "POST" else None, timeout=10)


@pytest.mark.parametrize(("method", "path"), ENDPOINTS, ids=[p for _, p in ENDPOINTS])
@pytest.mark.parametrize("key", [None, "wrong-key"], ids=["no-key", "wrong-key"])
def test_every_endpoint_needs_a_valid_key(keyed, method, path, key):
    response = _call(keyed, method, path, key)
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["code"] == ("missing_api_key" if key is None else "invalid_api_key")
    assert response.headers["www-authenticate"] == "Bearer"


def test_the_dashboard_page_itself_is_public(keyed):
    assert _call(keyed, "GET", "/", None).status_code == 200  # static files only; its data calls need the key


def test_official_client_without_the_key_is_refused(keyed):
    with pytest.raises(openai.AuthenticationError):
        keyed.client(key="not-the-key").models.list()
    assert [m.id for m in keyed.client(key=TENANT_A).models.list().data] == [keyed.model]


def _probe(server, messages, key: str, salt: str | None = None) -> int:
    body = {"messages": messages} | ({"cache_salt": salt} if salt is not None else {})
    response = server.post("/v1/cache/probe", body, key=key)
    assert response.status_code == 200, response.text
    return response.json()["cached_tokens"]


def test_salt_bound_to_a_key_isolates_tenants(keyed, unique):
    messages = [{"role": "user", "content": long_text(f"secret of tenant a {unique}", 30)}]
    keyed.client(key=TENANT_A).chat.completions.create(model=keyed.model, messages=messages, max_tokens=2)
    assert _probe(keyed, messages, TENANT_A) > 0
    assert _probe(keyed, messages, TENANT_B) == 0
    assert _probe(keyed, messages, ADMIN) == 0
    # No request salt reaches tenant a's namespace, whatever it spells.
    assert _probe(keyed, messages, ADMIN, salt="salt-a") == 0
    assert _probe(keyed, messages, TENANT_B, salt='["salt-a",""]') == 0
    # A tenant's own request salt subdivides its namespace.
    assert _probe(keyed, messages, TENANT_A, salt="drafts") == 0


def test_tenants_see_only_their_own_recent_requests_and_cannot_administer(keyed, unique):
    keyed.client(key=TENANT_B).completions.create(model=keyed.model, prompt=f"b {unique}", max_tokens=2)
    ids_a = {r["request_id"] for r in keyed.get("/v1/requests/recent", key=TENANT_A).json()["data"]}
    ids_b = {r["request_id"] for r in keyed.get("/v1/requests/recent", key=TENANT_B).json()["data"]}
    ids_admin = {r["request_id"] for r in keyed.get("/v1/requests/recent", key=ADMIN).json()["data"]}
    assert ids_b and not ids_a & ids_b
    assert ids_a | ids_b <= ids_admin
    for path, body in [("/v1/cache/clear", {}), ("/v1/cache/budget", {"tier": "device", "budget": "1G"})]:
        response = keyed.post(path, body, key=TENANT_A)
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "admin_only"
    assert keyed.post("/v1/cache/clear", {}, key=ADMIN).status_code == 200


def test_per_request_cache_salt_isolates(server, unique):
    messages = [{"role": "user", "content": long_text(f"salted {unique}", 30)}]
    reply = server.client().chat.completions.create(model=server.model, messages=messages, max_tokens=2,
                                                    extra_body={"cache_salt": "alpha"})  # fmt: skip
    assert reply.usage.prompt_tokens_details.cached_tokens == 0
    assert _probe(server, messages, None, salt="alpha") > 0
    assert _probe(server, messages, None, salt="beta") == 0
    assert _probe(server, messages, None) == 0
    again = server.client().chat.completions.create(model=server.model, messages=messages, max_tokens=2,
                                                    extra_body={"cache_salt": "beta"})  # fmt: skip
    assert again.usage.prompt_tokens_details.cached_tokens == 0
