"""The FastAPI app: routes, error shape, auth, metrics and the web chat page."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from producer.api import routes_completions, routes_conversations, routes_openai, routes_responses
from producer.api.auth import Authenticator, KeyRing, RateLimiter
from producer.api.config import ApiSettings, load_api_settings
from producer.api.errors import error_body, install_handlers
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
        app.state.svc.draining.set()
        await app.state.svc.aclose()

    app = FastAPI(title="chat-worker-pool", version="0.1.0", lifespan=lifespan)
    metrics = Metrics()
    svc = ChatService(settings, metrics)
    metrics.bind(svc.r, svc.keys, lambda: sorted(svc.client.models()), svc.queue_depth,
                 lambda: [w for m in sorted(svc.catalog.known()) for w in svc.catalog.info(m).workers])
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.svc = svc
    app.state.auth = Authenticator(
        keys, RateLimiter(svc.ar, settings.key_prefix, settings.rate_limit_per_min, settings.rate_limit_burst)
    )
    install_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:  # browser apps on these origins may call the API (preflights answered)
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type", "Last-Event-ID"],
                           expose_headers=["Retry-After"], max_age=600)
    app.include_router(routes_conversations.router)
    app.include_router(routes_openai.router)
    app.include_router(routes_completions.router)
    app.include_router(routes_responses.router)

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


class BodyLimit:
    """413 for a request body larger than `max_bytes`, decided before the body is parsed (by its
    Content-Length, or by counting a chunked one as it arrives)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(send)
            return
        seen, refused = 0, False

        async def counted() -> Message:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # a chunked body: answer now, and let the app see the client leave
                    refused = True
                    await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, counted, guarded_send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(error_body(413, f"request body larger than {self.max_bytes} bytes")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

