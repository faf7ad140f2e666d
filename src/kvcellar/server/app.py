"""The FastAPI application of `kvcellar serve`.

Operations: `create_app(engine, settings) -> FastAPI`, `serve(engine, settings)`
(uvicorn until Ctrl-C or SIGTERM, then the engine is closed).

`app.state` holds the engine, the settings, the EngineBridge (threads that
relay engine events to the loop) and the Telemetry (the one observer). The
dashboard is static files under /static, served at /; it holds no data, so
it needs no key (it asks for one and sends it with its API calls).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from kvcellar.server import cache_routes, openai_routes
from kvcellar.server.bridge import EngineBridge
from kvcellar.server.errors import install_error_handlers
from kvcellar.server.limits import BodyLimitMiddleware
from kvcellar.server.openapi import install_openapi
from kvcellar.server.settings import ServerSettings
from kvcellar.server.telemetry import Telemetry

log = logging.getLogger("kvcellar.server")
STATIC_DIR = resources.files("kvcellar.server") / "static"


async def _sample_rates(telemetry: Telemetry, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await asyncio.to_thread(telemetry.sample)
        except Exception:  # noqa: BLE001 - a failed sample must not stop the next ones
            log.exception("could not sample the cache counters")


def create_app(engine: object, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.telemetry.sample(force=True)
        sampler = asyncio.create_task(_sample_rates(app.state.telemetry, settings.rate_interval_s))
        try:
            yield
        finally:
            sampler.cancel()

    # No /docs or /redoc: their pages load scripts from a CDN, and this server works offline.
    app = FastAPI(title="kvcellar", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible server with a prefix KV cache you can watch and steer.")  # fmt: skip
    app.state.engine = engine
    app.state.settings = settings
    app.state.started_s = time.time()
    app.state.bridge = EngineBridge(engine, settings.max_concurrent_streams)
    app.state.telemetry = Telemetry(engine, settings)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_request_bytes=settings.max_request_bytes)
    app.include_router(openai_routes.router)
    app.include_router(cache_routes.router)
    install_openapi(app, settings)
    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")

    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(str(STATIC_DIR / "index.html"))

    return app


def serve(engine: object, settings: ServerSettings) -> None:
    """Run until interrupted; the engine is closed on the way out."""
    import uvicorn

    app = create_app(engine, settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=settings.log_level in ("debug", "info"), timeout_graceful_shutdown=5)  # fmt: skip
    server = uvicorn.Server(config)
    shown_host = f"[{settings.host}]" if ":" in settings.host else settings.host
    print(f"kvcellar: serving {engine.model_name} on http://{shown_host}:{settings.port}/ (dashboard at /, API under /v1)",
          file=sys.stderr, flush=True)  # fmt: skip
    try:
        server.run()
    finally:
        engine.close()
