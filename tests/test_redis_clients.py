"""config/redis_clients.py: a connection Redis drops while the pool is checking it is reconnected, in the
sync and the asyncio client (redis-py's own command retry does not cover taking a connection).

The pool checks an idle connection (`can_read`), reconnects it if it was closed, and checks it again.
A `CLIENT KILL` landing on both checks cannot be timed from outside, so `can_read` is made to find the
connection dropped twice; everything else (pool, reconnect, command) is the real client on real Redis.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import redis
import redis.asyncio as aredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from config.redis_clients import RETRIES, async_client, sync_client

DROPPED = "Connection closed by server."


def dropped_twice(real: Callable[..., Any], is_async: bool) -> tuple[Callable[..., Any], list[int]]:
    """A `can_read` that finds the connection closed on its first two calls (the pool's check, and its check
    again after reconnecting), then behaves."""
    calls = [0]

    def check() -> None:
        calls[0] += 1
        if calls[0] <= 2:
            raise redis.ConnectionError(DROPPED)

    def can_read(self: Any, *args: Any, **kwargs: Any) -> Any:
        check()
        return real(self, *args, **kwargs)

    async def acan_read(self: Any, *args: Any, **kwargs: Any) -> Any:
        check()
        return await real(self, *args, **kwargs)

    return (acan_read if is_async else can_read), calls


def test_sync_client_takes_a_connection_again(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = redis.Redis.from_url(redis_url, retry=Retry(ExponentialBackoff(), RETRIES),
                                 retry_on_error=[redis.ConnectionError])
    ours = sync_client(redis_url)
    plain.ping()
    first = ours.client_id()  # each holds an idle connection the pool will check
    can_read, calls = dropped_twice(redis.connection.AbstractConnection.can_read, is_async=False)
    monkeypatch.setattr(redis.connection.AbstractConnection, "can_read", can_read)

    with pytest.raises(redis.ConnectionError, match="closed by server"):
        plain.ping()  # redis-py alone: the error reaches the caller, whatever the command's retry
    calls[0] = 0
    assert ours.client_id() != first  # found dropped, reconnected: a new connection answered
    assert calls[0] == 1
    plain.close()
    ours.close()


def test_async_client_takes_a_connection_again(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async def run() -> None:
        plain = aredis.Redis.from_url(redis_url, retry=AsyncRetry(ExponentialBackoff(), RETRIES),
                                      retry_on_error=[redis.ConnectionError])
        ours = async_client(redis_url)
        await plain.ping()
        first = await ours.client_id()
        can_read, calls = dropped_twice(aredis.connection.AbstractConnection.can_read, is_async=True)
        monkeypatch.setattr(aredis.connection.AbstractConnection, "can_read", can_read)

        with pytest.raises(redis.ConnectionError, match="closed by server"):
            await plain.ping()
        calls[0] = 0
        assert await ours.client_id() != first
        assert calls[0] == 1
        await plain.aclose()
        await ours.aclose()

    asyncio.run(run())
