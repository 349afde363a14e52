"""API keys and the per-key rate limit.

Keys are configured as sha256 hex digests (CHAT_API_KEYS, comma separated, and/or CHAT_API_KEYS_FILE),
so the configuration never holds a usable secret. A request's key (`Authorization: Bearer KEY` or
`X-API-Key: KEY`) is hashed and compared with every configured digest in constant time. The caller's
id (the first 16 hex digits of the digest) owns the conversations it creates. With no key
configured, auth is off: every caller is "anonymous" and rate-limited per client address.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as aredis
from fastapi import Request

from config.settings import ConfigError
from producer.api.errors import ApiError

log = logging.getLogger(__name__)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")

# A token bucket per caller: refill `rate` tokens/s up to `burst`; a request takes one token.
# Redis's own clock, so API replicas with skewed clocks share one bucket correctly.
BUCKET = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local s = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(s[1]) or burst
local ts = tonumber(s[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local ok, wait = 0, 0
if tokens >= 1 then tokens = tokens - 1; ok = 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'ts', string.format('%.6f', now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return {ok, string.format('%.3f', wait)}
"""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Caller:
    id: str  # owner of the conversations it creates: a key's id, or "" with auth off
    bucket: str  # rate-limit bucket name


class KeyRing:
    def __init__(self, digests: list[str]):
        self.digests = [bytes.fromhex(d) for d in digests]

    @classmethod
    def from_config(cls, keys: str, keys_file: str | None) -> KeyRing:
        entries = [k.strip().lower() for k in keys.split(",") if k.strip()]
        if keys_file:
            try:
                lines = Path(keys_file).read_text().splitlines()
            except OSError as e:
                raise ConfigError(f"CHAT_API_KEYS_FILE: cannot read {keys_file}: {e}") from None
            entries += [ln.split("#", 1)[0].strip().lower() for ln in lines]
        entries = [e.removeprefix("sha256:") for e in entries if e]
        bad = [e for e in entries if not _HEX64.match(e)]
        if bad:
            raise ConfigError(f"CHAT_API_KEYS: expected sha256 hex digests (64 hex digits), got {bad[0][:12]!r}...")
        return cls(entries)

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def identify(self, key: str) -> str | None:
        """The key's id if it is configured. Every digest is compared, each in constant time."""
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for d in self.digests:
            if hmac.compare_digest(digest, d):
                found = d
        return found.hex()[:16] if found is not None else None


def presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("x-api-key") or None


class RateLimiter:
    def __init__(self, r: aredis.Redis, prefix: str, per_min: float, burst: int):
        self.rate = per_min / 60
        self.burst = burst
        self.prefix = prefix
        self._script = r.register_script(BUCKET)

    async def take(self, bucket: str) -> float:
        """0 when the request may go ahead, else the seconds until a token is back."""
        if self.rate <= 0:
            return 0.0
        ok, wait = await self._script(keys=[f"{self.prefix}:ratelimit:{bucket}"], args=[self.rate, self.burst])
        return 0.0 if int(ok) else float(wait)


class Authenticator:
    def __init__(self, keys: KeyRing, limiter: RateLimiter):
        self.keys = keys
        self.limiter = limiter

    async def __call__(self, request: Request) -> Caller:
        if self.keys.enabled:
            key = presented_key(request)
            if key is None:
                raise ApiError(401, "missing API key: send 'Authorization: Bearer KEY'", code="missing_api_key",
                               headers={"WWW-Authenticate": "Bearer"})
            kid = self.keys.identify(key)
            if kid is None:
                raise ApiError(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
            caller = Caller(kid, f"key:{kid}")
        else:
            host = request.client.host if request.client else "unknown"
            caller = Caller("", f"ip:{host}")
        wait = await self.limiter.take(caller.bucket)
        if wait > 0:
            request.app.state.metrics.rejected.labels("rate_limit").inc()
            raise ApiError(
                429,
                f"rate limit exceeded: {self.limiter.burst} requests at once, "
                f"{self.limiter.rate * 60:g} a minute; retry in {wait:.1f}s",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
        return caller
