"""API key parsing and the salt of a request: tenants can never reach each other's namespace."""

from __future__ import annotations

import itertools

import pytest

from kvcellar.config import ServerSettings
from kvcellar.server.settings import effective_salt, parse_api_keys


def test_parse_api_keys_binds_salts():
    assert parse_api_keys(["admin", "k1:tenant-a", "k2:a:b"]) == {"admin": None, "k1": "tenant-a", "k2": "a:b"}


@pytest.mark.parametrize("bad", [[""], [":salt"], ["key:"], ["k", "k:s"]])
def test_parse_api_keys_refuses_ambiguous_values(bad):
    with pytest.raises(ValueError, match="--api-key"):
        parse_api_keys(bad)


def test_no_tenant_and_no_salt_is_the_library_default_namespace():
    assert effective_salt(None, None) == ""
    assert effective_salt(None, "") == ""


def test_default_salt_applies_only_when_the_request_sends_none():
    assert effective_salt(None, None, "server") == effective_salt(None, "server")
    assert effective_salt(None, "mine", "server") == effective_salt(None, "mine")


def test_salts_never_collide_across_tenants():
    tenants = [None, "a", "b", '["a",""]', "a\x00"]
    request_salts = [None, "a", "b", '["a",""]', '["a",null]', "x"]
    seen: dict[str, tuple] = {}
    for tenant, salt in itertools.product(tenants, request_salts):
        key = effective_salt(tenant, salt)
        if key in seen:  # only the same tenant with an equivalent salt may share a namespace
            assert seen[key][0] == tenant and (seen[key][1] or "") == (salt or ""), (seen[key], (tenant, salt))
        seen[key] = (tenant, salt)


def test_settings_validate():
    with pytest.raises(ValueError, match="port"):
        ServerSettings(port=70000)
    with pytest.raises(ValueError, match="log_level"):
        ServerSettings(log_level="loud")
    assert not ServerSettings().auth_required
    assert ServerSettings(api_keys={"k": None}).auth_required
