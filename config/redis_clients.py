"""Every Redis client of the project is made here, with one policy for connection trouble.

A dropped connection (Redis' `timeout` closing an idle one, `CLIENT KILL`, a failover, a restart) is
retried with exponential backoff (50 ms doubling to 1 s, 6 retries: about 2.6 s of waiting plus the
connect attempts) before the error reaches the caller; idle connections are health-checked before use.
Everything sent through these clients is safe to send twice: reads, and Lua scripts written to be
idempotent (a script that ran but whose reply was lost changes nothing the second time).

redis-py runs a command's retry only around sending it. Taking a connection from the pool happens
before, outside that retry: the pool checks an idle connection, reconnects it if Redis closed it, and
checks it again; a connection dropped in between raised "Connection closed by server" straight to the
caller (seen as a rare 503 from the API under `CLIENT KILL`). Our connections' check reconnects a closed
connection itself, once and without backoff, and reports it ready; only if that fails does the pool's own
reconnect (with the retry above) run, so a drop needs three kills in a row to reach the caller, and an
outage is waited out once (about 3.5 s), not twice.
"""

from __future__ import annotations

import functools
from typing import Any

import redis
import redis.asyncio as aredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

RETRIES = 6
_RETRY_ON = [redis.ConnectionError, redis.TimeoutError]
_COMMON: dict[str, Any] = {"socket_connect_timeout": 2.0, "socket_keepalive": True, "health_check_interval": 15}


class _ReconnectingCheck:
    """Mixed into the URL's connection class: `can_read` (the pool's readiness check) reconnects a
    connection it finds closed, one attempt, instead of raising. Raises redis.ConnectionError (or
    TimeoutError) when that attempt fails: the pool then reconnects under the retry policy."""

    def can_read(self, *args: Any, **kwargs: Any) -> bool:
        try:
            return super().can_read(*args, **kwargs)  # type: ignore[misc]
        except redis.ConnectionError:
            self.disconnect()  # type: ignore[attr-defined]
            self.connect_check_health(retry_socket_connect=False)  # type: ignore[attr-defined]
            return False


class _AsyncReconnectingCheck:
    """`_ReconnectingCheck` for asyncio connections."""

    async def can_read(self, *args: Any, **kwargs: Any) -> bool:
        try:
            return await super().can_read(*args, **kwargs)  # type: ignore[misc]
        except redis.ConnectionError:
            await self.disconnect()  # type: ignore[attr-defined]
            await self.connect_check_health(retry_socket_connect=False)  # type: ignore[attr-defined]
            return False


@functools.cache
def _checked(mixin: type, base: type) -> type:
    """`base` (the URL's connection class) with `mixin`'s check: one class per pair, made once."""
    return type(f"Checked{base.__name__}", (mixin, base), {})


def sync_client(url: str) -> redis.Redis:
    """A client for `url` (redis://, rediss://, unix://) under this module's retry policy."""
    base = redis.connection.parse_url(url).get("connection_class", redis.Connection)
    return redis.Redis.from_url(
        url, retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), RETRIES), retry_on_error=_RETRY_ON,
        connection_class=_checked(_ReconnectingCheck, base), **_COMMON,
    )


def async_client(url: str) -> aredis.Redis:
    """`sync_client` for asyncio."""
    base = aredis.connection.parse_url(url).get("connection_class", aredis.Connection)
    return aredis.Redis.from_url(
        url, retry=AsyncRetry(ExponentialBackoff(cap=1.0, base=0.05), RETRIES), retry_on_error=_RETRY_ON,
        connection_class=_checked(_AsyncReconnectingCheck, base), **_COMMON,
    )
