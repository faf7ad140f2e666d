"""The FastAPI application of `kvcellar serve`.

Operations: `create_app(engine, settings) -> FastAPI`, `serve(engine, settings)`
(uvicorn until SIGTERM, SIGINT or SIGHUP; then the engine is
closed, its disk writes drained within `CacheConfig.drain_timeout_s`, and the
call returns, so the process exits 0).

`app.state` holds the engine, the settings, the EngineBridge (threads that
relay engine events to the loop) and the Telemetry (the one observer). The
dashboard is static files under /static, served at /; it holds no data, so
it needs no key (it asks for one and sends it with its API calls).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import threading
import time
from importlib import resources

import uvicorn
from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from kvcellar.config import ServerSettings
from kvcellar.engine.serving import ServingEngine
from kvcellar.server import anthropic_routes, cache_routes, openai_routes
from kvcellar.server.bridge import EngineBridge
from kvcellar.server.errors import install_error_handlers
from kvcellar.server.metrics import CountRejections
from kvcellar.server.limits import BodyLimitMiddleware
from kvcellar.server.openapi import install_openapi
from kvcellar.server.telemetry import Telemetry

log = logging.getLogger("kvcellar.server")
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
STATIC_DIR = resources.files("kvcellar.server") / "static"


async def _sample_rates(telemetry: Telemetry, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await asyncio.to_thread(telemetry.sample)
        except Exception:  # noqa: BLE001 - a failed sample must not stop the next ones
            log.exception("could not sample the cache counters")


def create_app(engine: ServingEngine, settings: ServerSettings | None = None) -> FastAPI:
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
    # The last added runs first: the counter wraps the body limit, so its 413 / 415 answers are counted too.
    app.add_middleware(BodyLimitMiddleware, max_request_bytes=settings.max_request_bytes)
    app.add_middleware(CountRejections, metrics=app.state.telemetry.metrics)
    app.include_router(openai_routes.router)
    app.include_router(anthropic_routes.router)
    app.include_router(cache_routes.router)
    install_openapi(app, settings)
    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")

    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(str(STATIC_DIR / "index.html"))

    return app


class _GracefulServer(uvicorn.Server):
    """uvicorn's Server, stopped by SIGTERM, SIGINT or SIGHUP alike, and never re-raising the signal.

    uvicorn re-raises a captured signal once its shutdown is done, which kills
    the process before the engine is closed: queued disk writes would be lost.
    Here the signal only asks uvicorn to finish; `serve` then drains the cache.
    """

    @contextlib.contextmanager
    def capture_signals(self):
        with _handling(STOP_SIGNALS, self.handle_exit):
            yield


@contextlib.contextmanager
def _handling(signals: tuple[int, ...], handler):
    """Install `handler` for `signals` (main thread only), restore the previous handlers afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _drain(engine: ServingEngine) -> None:
    """Close the engine (its disk writes drained within the cache's drain_timeout_s); say what was written and dropped."""
    started = time.monotonic()

    def still_draining(signum, frame) -> None:
        log.warning("kvcellar: still draining the disk tier (--drain-timeout bounds it); signal ignored")

    with _handling(STOP_SIGNALS, still_draining):
        report = engine.close()
    if report is not None and report.writing_tiers:
        tiers = " and ".join(report.writing_tiers)
        print(f"kvcellar: drained the {tiers} tier{'s' if len(report.writing_tiers) > 1 else ''}: "
              f"{report.num_written} written, {report.num_dropped} dropped "
              f"in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)  # fmt: skip


def serve(engine: ServingEngine, settings: ServerSettings) -> None:
    """Run until SIGTERM, SIGINT or SIGHUP; then close the engine, draining its disk writes, and return."""
    app = create_app(engine, settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=settings.log_level in ("debug", "info"), timeout_graceful_shutdown=5)  # fmt: skip
    server = _GracefulServer(config)
    shown_host = f"[{settings.host}]" if ":" in settings.host else settings.host
    print(f"kvcellar: serving {engine.model_name} on http://{shown_host}:{settings.port}/ (dashboard at /, API under /v1)",
          file=sys.stderr, flush=True)  # fmt: skip
    try:
        server.run()
    finally:
        _drain(engine)
