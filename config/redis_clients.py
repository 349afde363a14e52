"""Every Redis client of the project is made here, with one policy for connection trouble.

A dropped connection (Redis' `timeout` closing an idle one, `CLIENT KILL`, a failover, a restart) is
retried with exponential backoff (50 ms doubling to 1 s, 6 retries: about 2.6 s of waiting plus the
connect attempts) before the error reaches the caller; idle connections are health-checked before use.
Everything sent through these clients is safe to send twice: reads, and Lua scripts written to be
idempotent (a script that ran but whose reply was lost changes nothing the second time).
"""

from __future__ import annotations

import redis
import redis.asyncio as aredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

RETRIES = 6
_RETRY_ON = [redis.ConnectionError, redis.TimeoutError]
_COMMON = {"socket_connect_timeout": 2.0, "socket_keepalive": True, "health_check_interval": 15}


def sync_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(
        url, retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), RETRIES), retry_on_error=_RETRY_ON, **_COMMON
    )


def async_client(url: str) -> aredis.Redis:
    return aredis.Redis.from_url(
        url, retry=AsyncRetry(ExponentialBackoff(cap=1.0, base=0.05), RETRIES), retry_on_error=_RETRY_ON, **_COMMON
    )
