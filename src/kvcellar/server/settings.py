"""Server settings and tenant salts.

Operations: `ServerSettings` (validated, frozen), `parse_api_keys(["KEY", "KEY:SALT"])`,
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
from dataclasses import dataclass, field

LOG_LEVELS = ("debug", "info", "warning", "error")


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


@dataclass(frozen=True)
class ServerSettings:
    """How `kvcellar serve` listens and whom it serves.

    `api_keys`: key -> bound salt (None = an admin key, which may also clear
    and resize the cache). Empty means no authentication (bind to 127.0.0.1).
    `default_max_tokens`: used when a request gives no max_tokens (capped by
    the context left after the prompt). `metrics_public`: GET /metrics
    answers without a key (with keys set it otherwise needs an admin key:
    its figures cover every tenant).
    `max_request_bytes`: the largest request body read (413 above it). The
    default, 8 MiB, holds a prompt filling a 128K-token context even when a
    client escapes every character as JSON `\\uXXXX` (about 4 characters per
    token, 6 bytes per escaped character: 3 MiB), with room to spare, while
    capping what one request can make the server hold.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: dict[str, str | None] = field(default_factory=dict)
    default_salt: str = ""
    log_level: str = "warning"
    default_max_tokens: int = 256
    num_recent_requests: int = 100
    rate_interval_s: float = 5.0
    max_concurrent_streams: int = 256
    metrics_public: bool = False
    max_request_bytes: int = 8 * 1024 * 1024

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535 (got {self.port})")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)} (got {self.log_level!r})")
        if self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1 (got {self.default_max_tokens})")
        if self.num_recent_requests < 1:
            raise ValueError(f"num_recent_requests must be >= 1 (got {self.num_recent_requests})")
        if self.rate_interval_s <= 0:
            raise ValueError(f"rate_interval_s must be > 0 (got {self.rate_interval_s})")
        if self.max_concurrent_streams < 1:
            raise ValueError(f"max_concurrent_streams must be >= 1 (got {self.max_concurrent_streams})")
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be >= 1024, room for a small request (got {self.max_request_bytes})")

    @property
    def auth_required(self) -> bool:
        return bool(self.api_keys)
