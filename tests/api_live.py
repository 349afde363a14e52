"""Helpers for the API tests: uvicorn on a free port in a thread, and the worker stack beside it."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

from producer.api import create_app
from producer.api.auth import hash_key
from producer.api.config import ApiSettings, load_api_settings
from producer.api.server import make_server
from producer.embedded import InProcessWorker, free_port
from tests.conftest import tiny_settings

KEY_A = "sk-test-alice-0123456789"
KEY_B = "sk-test-bob-9876543210"
KEYS = f"{hash_key(KEY_A)},{hash_key(KEY_B)}"


class LiveServer:
    def __init__(self, settings: ApiSettings):
        self.settings = settings
        self.app = create_app(settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(self.app, "127.0.0.1", self.port, "warning", settings.api_shutdown_grace_s)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        end = time.monotonic() + 15
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > end:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.handle_exit(signal.SIGTERM, None)  # as a SIGTERM would: streams are told, then it exits
        self.thread.join(30)


@contextmanager
def live_api(redis_url: str, **over: Any) -> Iterator[LiveServer]:
    base: dict[str, Any] = {"redis_url": redis_url, "api_keys": KEYS, "rate_limit_per_min": 0}
    server = LiveServer(load_api_settings(**{**base, **over})).start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def tiny_worker(redis_url: str, **over: Any) -> Iterator[InProcessWorker]:
    """Flush the test db, then one in-process worker serving tiny-neox (one per process at a time); `over`
    overrides its settings (tiny_settings)."""
    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    worker = InProcessWorker(tiny_settings(redis_url, **over)).start()
    try:
        yield worker
    finally:
        worker.stop()
        r.flushdb()
        r.close()


def openai_client(url: str, key: str = KEY_A) -> Any:
    """The official openai client on a live server's /v1 (`url`: LiveServer.url), no retries, 60 s timeout."""
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)
