"""Serving the app with uvicorn, with a bounded graceful shutdown.

On SIGTERM/SIGINT uvicorn stops accepting connections and waits for open ones; this server also sets
the service's `draining` event at once, so open SSE streams send a final event and requests waiting for
a reply answer within CHAT_API_SHUTDOWN_GRACE_S (their turns stay in Redis and complete); uvicorn's
`timeout_graceful_shutdown` then bounds whatever is left. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from fastapi import FastAPI


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, draining: asyncio.Event):
        super().__init__(config)
        self.draining = draining
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.loop is not None:  # a signal handler: hand the event to the loop's thread
            self.loop.call_soon_threadsafe(self.draining.set)
        super().handle_exit(sig, frame)


def make_server(app: FastAPI, host: str, port: int, log_level: str = "info", grace_s: float = 10.0) -> GracefulServer:
    # log_config=None: uvicorn's lines go through the process's logging set-up (one format for all lines)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, proxy_headers=True, lifespan="on",
                            timeout_graceful_shutdown=max(1, round(grace_s)), log_config=None)
    return GracefulServer(config, app.state.svc.draining)
