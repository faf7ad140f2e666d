"""`kvcellar serve`: an OpenAI-compatible HTTP server with cache observability.

Typed against `kvcellar.engine.serving.ServingEngine`; its settings are
`kvcellar.config.ServerSettings`. Modules: `settings` (API keys, tenant
salts), `auth` (keys -> tenants), `errors` (OpenAI's error shape), `schemas`
(request bodies), `prepare` (body -> token ids + sampling), `bridge` (engine
events to the event loop, cancellation), `responses` (OpenAI response bodies
and SSE), `openai_routes`, `cache_routes` (stats, probe, clear, budget,
recent, metrics), `telemetry` (the one observer of finished requests),
`stats` (ServerStats, the one snapshot every figure is read from), `metrics`
(Prometheus), `rates` (1 / 5 / 15 minute windows), `recent` (recent
requests), `app` (create_app, serve), `static/` (the dashboard).
"""

from kvcellar.config import ServerSettings
from kvcellar.server.app import create_app, serve
from kvcellar.server.settings import parse_api_keys

__all__ = ["ServerSettings", "create_app", "parse_api_keys", "serve"]
