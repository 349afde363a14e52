"""The embedded stack: fakeredis's TCP server plus one Celery worker, in this process.

No servers needed: `make chat` runs the real producer -> Redis protocol -> Celery worker -> engine
path, with fakeredis standing in for redis-server. Also used by tests for the fast path.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from types import TracebackType
from typing import Any

from config.settings import Settings, load_settings

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeRedisServer:
    """fakeredis's TCP server on a free port (kombu needs its Lua support: fakeredis[lua])."""

    def __init__(self) -> None:
        from fakeredis import TcpFakeServer

        self.port = free_port()
        self.server = TcpFakeServer(("127.0.0.1", self.port), server_type="redis")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.thread = threading.Thread(target=self.server.serve_forever, name="fakeredis", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class InProcessWorker:
    """A real Celery WorkController (threads pool) running in a background thread."""

    def __init__(self, settings: Settings, hostname: str = "embedded@localhost", loglevel: str = "WARNING"):
        from celery.app import trace

        from worker.app import make_worker_app, worker_options

        self.settings = settings
        self.app = make_worker_app(settings)
        opts: dict[str, Any] = worker_options(settings, hostname, loglevel)
        # What `celery worker` does before it starts: point the pool threads' task lookup at this
        # app (without it they look on Celery's default app and find no `generate` task).
        trace.setup_worker_optimizations(self.app, hostname)
        self.controller = self.app.WorkController(**opts)
        self.thread = threading.Thread(target=self.controller.start, name="celery-worker", daemon=True)

    def start(self, timeout: float = 600) -> InProcessWorker:
        self.thread.start()
        end = time.monotonic() + timeout
        while self.app.chat_runtime.runtime is None:  # the pipeline step attaches it once loaded
            if not self.thread.is_alive() or time.monotonic() > end:
                raise RuntimeError("the embedded worker failed to start (see the log above)")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Stop as a signal would: the worker's own thread ends its event loop and runs the warm shutdown.
        (Calling WorkController.stop from this thread raced the event loop still running in the worker's:
        kombu's timer then saw a set change mid-iteration and logged a traceback at exit.)"""
        from celery.worker import state

        lifecycle = getattr(self.controller, "chat_lifecycle", None)
        if lifecycle is not None and self.thread.is_alive():
            lifecycle.request_stop("embedded worker stopped by its owner")
            self.thread.join(self.settings.shutdown_grace_s + 30)
        if self.thread.is_alive():  # it never got as far as its event loop
            self.controller.stop(in_sighandler=False)
            self.thread.join(30)
        state.should_stop = None  # process-wide in Celery: another embedded worker in this process must run


class EmbeddedStack:
    def __init__(self, redis_url: str | None = None, **overrides: Any):
        self.fake = None if redis_url else FakeRedisServer()
        self.url = redis_url or self.fake.url  # type: ignore[union-attr]
        self.settings = load_settings(redis_url=self.url, **overrides)
        self.worker = InProcessWorker(self.settings)

    def __enter__(self) -> EmbeddedStack:
        try:
            self.worker.start()
        except BaseException:
            # __exit__ does not run when __enter__ raises: without this the fake Redis server's threads keep the
            # process alive after the error (`make chat` hung on a worker that could not start).
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.worker.stop()
        if self.fake:
            self.fake.close()
