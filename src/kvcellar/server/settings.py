"""API keys and tenant salts (the settings themselves are `kvcellar.config.ServerSettings`).

Operations: `parse_api_keys(["KEY", "KEY:SALT"])`,
`effective_salt(bound_salt, request_salt, default_salt)`, `salt_tenant(cache_salt)` (its inverse:
whose namespace an engine salt is).

Salts: every request runs in the cache namespace of one salt string. A key
bound to a salt (a *tenant* key) always runs in that tenant's namespace;
the request's own `cache_salt` can only subdivide it. `effective_salt`
encodes (tenant, salt) unambiguously, so no request salt, whatever its
text, can name another tenant's namespace.
"""

from __future__ import annotations

import json


def parse_api_keys(values: list[str] | tuple[str, ...]) -> dict[str, str | None]:
    """`["admin", "k1:tenant-a"]` -> {"admin": None, "k1": "tenant-a"}; the salt follows the first ':'."""
    keys: dict[str, str | None] = {}
    for value in values:
        key, sep, salt = value.partition(":")
        if not key:
            raise ValueError(f"--api-key {value!r} has an empty key: write KEY or KEY:SALT")
        if sep and not salt:
            raise ValueError(f"--api-key {value!r} has an empty salt after ':': write KEY or KEY:SALT")
        if key in keys:
            raise ValueError(f"--api-key {key!r} is given twice: give each key once")
        keys[key] = salt or None
    return keys


def effective_salt(bound_salt: str | None, request_salt: str | None, default_salt: str = "") -> str:
    """The engine's `cache_salt` for one request.

    No tenant and no salt at all gives "" (the library's default namespace,
    so a server and a library sharing a cache directory share entries).
    Otherwise a JSON pair [tenant or null, salt]: a request salt can never
    equal a tenant's pair, because only a bound key sets the first item.
    """
    salt = request_salt or default_salt
    if bound_salt is None and not salt:
        return ""
    return json.dumps([bound_salt, salt], ensure_ascii=True, separators=(",", ":"))


def salt_tenant(cache_salt: str) -> str | None:
    """The bound salt of the tenant whose namespace the engine salt `cache_salt` is; None: no tenant's.

    Only `effective_salt`'s pairs name a tenant; "" and any other string (a library caller's own
    salt in the same engine) belong to no tenant.
    """
    try:
        pair = json.loads(cache_salt)
    except ValueError:
        return None
    if isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str):
        return pair[0]
    return None
