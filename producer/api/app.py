"""The FastAPI app: routes, error shape, auth, metrics and the web chat page."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from producer.api import routes_conversations, routes_openai
from producer.api.auth import Authenticator, KeyRing, RateLimiter
from producer.api.config import ApiSettings, load_api_settings
from producer.api.errors import install_handlers
from producer.api.metrics import Metrics
from producer.api.service import ChatService

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or load_api_settings()
    keys = KeyRing.from_config(settings.api_keys, settings.api_keys_file)
    if keys.enabled:
        log.info("auth on: %d API key(s) configured", len(keys.digests))
    else:
        log.warning("auth OFF: no API keys configured (CHAT_API_KEYS / CHAT_API_KEYS_FILE); every caller is anonymous")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await app.state.svc.aclose()

    app = FastAPI(title="chat-worker-pool", version="0.1.0", lifespan=lifespan)
    metrics = Metrics()
    svc = ChatService(settings, metrics)
    metrics.bind(svc.r, svc.keys, lambda: sorted(svc.client.models()), svc.queue_depth)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.svc = svc
    app.state.auth = Authenticator(
        keys, RateLimiter(svc.ar, settings.key_prefix, settings.rate_limit_per_min, settings.rate_limit_burst)
    )
    install_handlers(app)
    app.include_router(routes_conversations.router)
    app.include_router(routes_openai.router)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/info", tags=["meta"])
    def info() -> dict[str, object]:
        """Unauthenticated: whether the page must ask for a key."""
        return {"auth": keys.enabled, "version": app.version}

    @app.get("/healthz", tags=["meta"])
    def healthz() -> dict[str, str]:
        svc.r.ping()
        return {"status": "ok"}

    @app.get("/metrics", tags=["meta"])
    async def prometheus() -> Response:
        def render() -> bytes:
            metrics.scrape()
            return generate_latest(metrics.registry)

        return Response(await run_in_threadpool(render), media_type=CONTENT_TYPE_LATEST)

    return app
