"""API keys and tenants.

Operations: `Tenant` (who sent a request, and in which cache namespace it
runs), `current_tenant` (a FastAPI dependency: reads `Authorization: Bearer
KEY`, or Anthropic's `x-api-key: KEY`), `require_admin`, `metrics_reader` (GET /metrics).

With no keys configured every caller is an admin in the default namespace.
With keys, every data endpoint needs one (401 otherwise); keys bound to a
salt are tenants: their requests, probes, recent-request list and cache
figures stay in their own namespace, and only admin keys may clear or
resize the cache or read the global figures (/metrics, whose per-tier and
per-request series cover every tenant, unless `metrics_public` opens it).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from kvcellar.server.errors import APIError
from kvcellar.config import ServerSettings
from kvcellar.server.settings import effective_salt, salt_tenant

_bearer = HTTPBearer(auto_error=False, description="the key given to `kvcellar serve --api-key`")


@dataclass(frozen=True)
class Tenant:
    bound_salt: str | None  # None: an admin (or no keys configured)
    default_salt: str = ""

    @property
    def is_admin(self) -> bool:
        return self.bound_salt is None

    def salt_for(self, request_salt: str | None) -> str:
        return effective_salt(self.bound_salt, request_salt, self.default_salt)

    def may_see(self, record_tenant: str | None) -> bool:
        """Admins see every recent request; a tenant only its own."""
        return self.is_admin or record_tenant == self.bound_salt

    def owns_salt(self, cache_salt: str) -> bool:
        """Whether the engine salt `cache_salt` is in this tenant's namespace (for a tenant key only)."""
        return self.bound_salt is not None and salt_tenant(cache_salt) == self.bound_salt


def _match_key(settings: ServerSettings, presented: str) -> tuple[bool, str | None]:
    found, bound = False, None
    for key, salt in settings.api_keys.items():
        # compare_digest on every key: the time taken does not tell which key was close.
        if hmac.compare_digest(key.encode(), presented.encode()):
            found, bound = True, salt
    return found, bound


async def current_tenant(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Tenant:
    settings: ServerSettings = request.app.state.settings
    if not settings.auth_required:
        return Tenant(None, settings.default_salt)
    key = request.headers.get("x-api-key")  # Anthropic's clients send the key this way
    if key is None and credentials is not None and credentials.scheme.lower() == "bearer":
        key = credentials.credentials
    if key is None:
        raise APIError(401, "this server needs an API key: send the header 'Authorization: Bearer KEY' (or 'x-api-key: "
                            "KEY')", code="missing_api_key")  # fmt: skip
    found, bound = _match_key(settings, key)
    if not found:
        raise APIError(401, "the API key is not valid for this server", code="invalid_api_key")
    return Tenant(bound, settings.default_salt)


async def require_admin(tenant: Tenant = Depends(current_tenant)) -> Tenant:
    if not tenant.is_admin:
        raise APIError(403, "this key is bound to a tenant salt and may not change the shared cache; use an admin key",
                       code="admin_only")  # fmt: skip
    return tenant


async def metrics_reader(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Tenant:
    """GET /metrics: open with `metrics_public` (any key, or none, is ignored); else an admin key, when keys are set."""
    settings: ServerSettings = request.app.state.settings
    if settings.metrics_public:
        return Tenant(None, settings.default_salt)
    tenant = await current_tenant(request, credentials)
    if not tenant.is_admin:
        raise APIError(403, "/metrics covers every tenant: it needs an admin key (or a server started with "
                            "--metrics-public); a tenant key reads its own figures at GET /v1/cache/stats",
                       code="admin_only")  # fmt: skip
    return tenant
