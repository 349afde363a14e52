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

Redis Sentinel: a URL list `sentinel://host:port;sentinel://host:port[/db]` (kombu's form, so Celery's
broker takes the same string) plus the master's name (`CHAT_REDIS_MASTER_NAME`) makes a client that
asks the sentinels where the primary is on every connect, so after a failover the retried command lands
on the promoted replica; a connection still open to a demoted primary answers READONLY, which redis-py
turns into a connection error (and so a retry). Credentials and db come from the first entry and are
the data nodes' (the sentinels themselves are reached without a password). Redis Cluster is not
supported: Celery's Redis transport cannot use it.

A Sentinel-managed connection must only ever talk to the primary. redis-py reconnects a connection
dropped under a command (the command's retry) to the address it had, without asking the sentinels: after a
failover that is the old primary's address, where the node comes back as a replica, empty until it has
synced. Writes there fail (READONLY: a retry, to the same address again), but reads answer from the wrong
dataset: a reader blocked in XREAD when the primary died stayed there and could be told "turn not found"
for a turn that went on to be answered (a write's WAIT, counting that replica, does not help before it has
synced). A sentinel that has not heard of a failover yet names that node too. So every connect of
ours asks the sentinels, and checks, before its first command, that the node answers ROLE as a master; one
that does not is a connection error (a retry, which asks the sentinels again, that sentinel last).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio as aredis
import redis.asyncio.sentinel as asentinel
import redis.sentinel as sentinel
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from redis.utils import str_if_bytes

RETRIES = 6
SENTINEL_SCHEME = "sentinel"
SENTINEL_PORT = 26379
DEFAULT_MASTER_NAME = "mymaster"  # the name redis' own sentinel.conf example monitors
_RETRY_ON = [redis.ConnectionError, redis.TimeoutError]
_COMMON: dict[str, Any] = {"socket_connect_timeout": 2.0, "socket_keepalive": True, "health_check_interval": 15}
# The sentinels are asked on every connect: a sentinel that does not answer is skipped quickly.
_SENTINEL_KW: dict[str, Any] = {"socket_connect_timeout": 0.5, "socket_timeout": 0.5}


def _retryable(error: Exception) -> bool:
    """A wrong password is final: redis-py files AuthenticationError under ConnectionError, and retrying it
    (connect and command retries nested) kept a misconfigured client waiting about 30 s."""
    return not isinstance(error, redis.AuthenticationError)


class _Retry(Retry):
    """The retry policy above, AuthenticationError excepted."""

    def call_with_retry(self, do: Any, fail: Any, is_retryable: Any = None, with_failure_count: bool = False) -> Any:
        return super().call_with_retry(do, fail, lambda e: _retryable(e) and (is_retryable or bool)(e),
                                       with_failure_count)


class _AsyncRetry(AsyncRetry):
    """`_Retry` for asyncio."""

    async def call_with_retry(self, do: Any, fail: Any, is_retryable: Any = None,
                              with_failure_count: bool = False) -> Any:
        return await super().call_with_retry(do, fail, lambda e: _retryable(e) and (is_retryable or bool)(e),
                                             with_failure_count)


@dataclass(frozen=True)
class SentinelTarget:
    """A Sentinel-managed primary: where the sentinels are, the master's name, and the data nodes' db and
    credentials. Parsed from `sentinel://[[user]:password@]host[:port][/db];sentinel://host[:port];...`."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def _port(entry: str, default: int) -> int:
    """`entry`'s port, or `default` when it names none. Raises ValueError unless it is 1 to 65535."""
    netloc = urlsplit(entry).netloc
    text = netloc.rpartition("@")[2].rpartition("]")[2].partition(":")[2]  # after the host (IPv6 in [])
    if not text:
        return default
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
        raise ValueError(f"{entry!r}: the port must be a number from 1 to 65535, got {text!r}")
    return int(text)


def _db(entry: str, path: str) -> int:
    db = path.strip("/")
    if db and not (db.isascii() and db.isdigit()):
        raise ValueError(f"{entry!r}: the db must be a number, got {db!r}")
    return int(db or 0)


def check_redis_url(url: str, master_name: str = DEFAULT_MASTER_NAME) -> None:
    """Raises ValueError naming what is wrong with `url` as CHAT_REDIS_URL: what every client of the project
    and Celery's broker must read alike. redis://, rediss:// (host, port 1-65535, db a number), unix://, or
    a sentinel:// list (sentinel_target)."""
    if not url or any(c.isspace() for c in url):
        raise ValueError("must be a Redis URL without spaces (redis://host:6379/0, or sentinel://host:26379/0;...)")
    if sentinel_target(url, master_name) is not None:
        return
    u = urlsplit(url)
    if u.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"the scheme must be redis://, rediss://, unix:// or sentinel://, got {url[:40]!r}")
    if ";" in url:
        raise ValueError("a list of URLs (';') is for sentinels only: sentinel://host:26379/0;sentinel://...")
    if u.scheme != "unix":
        if not u.hostname:
            raise ValueError(f"{url[:60]!r}: no host")
        _port(url, 6379)
        _db(url, u.path)


def sentinel_target(url: str, master_name: str = DEFAULT_MASTER_NAME) -> SentinelTarget | None:
    """The SentinelTarget a `sentinel://` URL list names, or None for any other URL (redis://, rediss://,
    unix://). Raises ValueError naming what is wrong (an empty or padded entry, an entry of another scheme,
    no host, a bad port or db, a query, a db or credentials on a later entry only, an empty master name):
    everything that Celery's broker (kombu) would read otherwise than our clients, or not at all."""
    entries = url.split(";")
    if urlsplit(entries[0].strip()).scheme.lower() != SENTINEL_SCHEME:
        return None
    if not master_name or any(c.isspace() for c in master_name):
        raise ValueError("a sentinel:// URL needs the master's name without spaces (CHAT_REDIS_MASTER_NAME)")
    hosts, first = [], urlsplit(entries[0])
    for entry in entries:
        if entry == "" or entry != entry.strip():
            raise ValueError(f"{url[:80]!r}: an empty or space-padded entry (entries are sentinel://host:port, "
                             "joined by ';' alone)")
        u = urlsplit(entry)
        if u.scheme.lower() != SENTINEL_SCHEME:
            raise ValueError(f"{entry!r}: every entry of a sentinel URL list must be sentinel://host:port")
        if u.query or u.fragment:
            raise ValueError(f"{entry!r}: no query or fragment (Celery's broker cannot take them)")
        if not u.hostname:
            raise ValueError(f"{entry!r}: no host")
        if (u.path.strip("/"), u.username, u.password) not in (("", None, None), (first.path.strip("/"),
                                                                                  first.username, first.password)):
            raise ValueError(f"{entry!r}: put the db and credentials on the first entry (Celery's broker reads "
                             "them from that one only)")
        hosts.append((u.hostname, _port(entry, SENTINEL_PORT)))
    return SentinelTarget(tuple(hosts), master_name, _db(entries[0], first.path),
                          unquote(first.username) if first.username else None,
                          unquote(first.password) if first.password else None)


class _ReconnectingCheck:
    """Mixed into the URL's connection class: `can_read` (the pool's readiness check) reconnects a
    connection it finds closed, one attempt, instead of raising. Raises redis.ConnectionError (or
    TimeoutError) when that attempt fails: the pool then reconnects under the retry policy."""

    def can_read(self, *args: Any, **kwargs: Any) -> bool:
        try:
            return super().can_read(*args, **kwargs)  # type: ignore[misc]
        except redis.ConnectionError:
            self.disconnect()  # type: ignore[attr-defined]
            self._reconnect_once()
            return False

    def _reconnect_once(self) -> None:
        if isinstance(self, sentinel.SentinelManagedConnection):
            self._connect_retry()  # asks the sentinels where the primary is now
        else:
            self.connect_check_health(retry_socket_connect=False)  # type: ignore[attr-defined]


class _AsyncReconnectingCheck:
    """`_ReconnectingCheck` for asyncio connections."""

    async def can_read(self, *args: Any, **kwargs: Any) -> bool:
        try:
            return await super().can_read(*args, **kwargs)  # type: ignore[misc]
        except redis.ConnectionError:
            await self.disconnect()  # type: ignore[attr-defined]
            if isinstance(self, asentinel.SentinelManagedConnection):
                await self._connect_retry()
            else:
                await self.connect_check_health(retry_socket_connect=False)  # type: ignore[attr-defined]
            return False


def _not_primary(conn: Any, address: Any, role: Any) -> redis.ConnectionError | None:
    """The error for a node a sentinel named whose ROLE reply is not a master's (None if it is). The
    sentinel that named it goes last in the manager's list (discover_master put it first), so the retry asks
    the others first."""
    name = str_if_bytes(role[0]) if isinstance(role, (list, tuple)) and role else str(role)
    if name == "master":
        return None
    sentinels = conn.connection_pool.sentinel_manager.sentinels
    if len(sentinels) > 1:
        sentinels.append(sentinels.pop(0))
    return redis.ConnectionError(f"{address[0]}:{address[1]}, named by a sentinel as the primary, is a {name}: "
                                 "asking the sentinels again")


class _PrimaryCheck:
    """Mixed into Sentinel-managed connections to the primary: every connect asks the sentinels, and the node
    they name answers ROLE as a master, or the connect is a ConnectionError (retried). A node that refuses
    ROLE (an ACL without it) is taken at the sentinels' word."""

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        # redis-py reconnects a dropped connection here, when a command is sent again under its retry, to the
        # address it had (connect_check_health), not asking the sentinels: after a failover, the old primary's
        # address (the node back as a replica, empty until it has synced).
        if not self._sock:  # type: ignore[attr-defined]
            self._connect_retry()  # type: ignore[attr-defined]
        super().send_packed_command(command, check_health)  # type: ignore[misc]

    def connect_to(self, address: Any) -> None:
        super().connect_to(address)  # type: ignore[misc]
        try:
            self.send_command("ROLE")  # type: ignore[attr-defined]
            role = self.read_response()  # type: ignore[attr-defined]
        except redis.ResponseError:
            return
        if (error := _not_primary(self, address, role)) is not None:
            self.disconnect()  # type: ignore[attr-defined]
            raise error


class _AsyncPrimaryCheck:
    """`_PrimaryCheck` for asyncio connections."""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if not self.is_connected:  # type: ignore[attr-defined]
            await self._connect_retry()  # type: ignore[attr-defined]
        await super().send_packed_command(command, check_health)  # type: ignore[misc]

    async def connect_to(self, address: Any) -> None:
        await super().connect_to(address)  # type: ignore[misc]
        try:
            await self.send_command("ROLE")  # type: ignore[attr-defined]
            role = await self.read_response()  # type: ignore[attr-defined]
        except redis.ResponseError:
            return
        if (error := _not_primary(self, address, role)) is not None:
            await self.disconnect()  # type: ignore[attr-defined]
            raise error


@functools.cache
def _checked(base: type, *mixins: type) -> type:
    """`base` (the URL's connection class) with the `mixins`' checks: one class per combination, made once."""
    return type(f"Checked{base.__name__}", (*mixins, base), {})


@dataclass(frozen=True)
class _Flavour:
    """redis-py's sync or asyncio classes: one recipe makes both clients."""

    client: type
    sentinel: type
    managed: type  # the Sentinel-managed connection class
    plain: type  # the connection class when the URL names none
    parse_url: Any
    retry: type
    check: type  # our readiness-check mixin
    primary: type  # our mixin checking that a Sentinel-managed connection reached the primary


_SYNC = _Flavour(redis.Redis, sentinel.Sentinel, sentinel.SentinelManagedConnection, redis.Connection,
                 redis.connection.parse_url, _Retry, _ReconnectingCheck, _PrimaryCheck)
_ASYNC = _Flavour(aredis.Redis, asentinel.Sentinel, asentinel.SentinelManagedConnection, aredis.Connection,
                  aredis.connection.parse_url, _AsyncRetry, _AsyncReconnectingCheck, _AsyncPrimaryCheck)


def _client(f: _Flavour, url: str, master_name: str, password: str | None, retries: int) -> Any:
    common = {"retry": f.retry(ExponentialBackoff(cap=1.0, base=0.05), retries), "retry_on_error": _RETRY_ON,
              **_COMMON}
    target = sentinel_target(url, master_name)
    if target is not None:
        manager = f.sentinel(list(target.sentinels), sentinel_kwargs=dict(_SENTINEL_KW))
        return manager.master_for(target.master_name, f.client, db=target.db, username=target.username,
                                  password=target.password or password,
                                  connection_class=_checked(f.managed, f.check, f.primary), **common)
    base = f.parse_url(url).get("connection_class", f.plain)
    # The URL's own password, if any, wins over `password`.
    return f.client.from_url(url, password=password, connection_class=_checked(base, f.check), **common)


def sync_client(url: str, *, master_name: str = DEFAULT_MASTER_NAME, password: str | None = None,
                retries: int = RETRIES) -> redis.Redis:
    """A client for `url` (redis://, rediss://, unix://, or a sentinel:// list with `master_name`) under
    this module's retry policy (`retries=0`: fail at the first connection error). `password`: used when the
    URL carries none (Settings.redis_options gives both). Raises ValueError for a malformed sentinel URL."""
    return _client(_SYNC, url, master_name, password, retries)


def async_client(url: str, *, master_name: str = DEFAULT_MASTER_NAME, password: str | None = None) -> aredis.Redis:
    """`sync_client` for asyncio."""
    return _client(_ASYNC, url, master_name, password, RETRIES)
