"""config/redis_clients.py: a connection Redis drops while the pool is checking it is reconnected, in the
sync and the asyncio client (redis-py's own command retry does not cover taking a connection); sentinel://
URL lists are parsed strictly, and clients made from one follow a failover and talk to the primary alone,
even where a sentinel names a replica (real redis-server and `redis-server --sentinel` processes).

The pool checks an idle connection (`can_read`), reconnects it if it was closed, and checks it again.
A `CLIENT KILL` landing on both checks cannot be timed from outside, so `can_read` is made to find the
connection dropped twice; everything else (pool, reconnect, command) is the real client on real Redis.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from config.redis_clients import RETRIES, SentinelTarget, async_client, sentinel_target, sync_client
from config.settings import ConfigError, load_settings
from producer.embedded import free_port
from tests.procs import RedisServer, SentinelCluster

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


def test_a_password_kept_out_of_the_url_reaches_every_client() -> None:
    """CHAT_REDIS_PASSWORD: the sync and asyncio clients and Celery's broker connection all authenticate."""
    from worker.app import make_worker_app

    server = RedisServer(password="s3cret:@/")
    try:
        settings = load_settings(redis_url=server.url, redis_password="s3cret:@/")
        t0 = time.monotonic()
        with pytest.raises(redis.AuthenticationError):
            sync_client(server.url).ping()
        assert time.monotonic() - t0 < 5  # final, not retried (nested retries made it ~30 s)
        assert sync_client(server.url, **settings.redis_options()).ping()

        async def run() -> bool:
            ar = async_client(server.url, **settings.redis_options())
            try:
                return bool(await ar.ping())
            finally:
                await ar.aclose()

        assert asyncio.run(run())
        with make_worker_app(settings).connection_for_write() as conn:
            assert conn.default_channel.client.ping()
    finally:
        server.close()


# -- Sentinel ---------------------------------------------------------------------------------------------


def test_sentinel_url_lists_parse_like_celerys_broker_reads_them() -> None:
    assert sentinel_target("redis://127.0.0.1:6379/0") is None
    assert sentinel_target("sentinel://:p%40ss@a:1/3;sentinel://b;sentinel://c:7", "pool") == SentinelTarget(
        (("a", 1), ("b", 26379), ("c", 7)), "pool", 3, None, "p@ss")


@pytest.mark.parametrize(("url", "says"), [
    ("sentinel://a:1;redis://b:2", "every entry of a sentinel URL list must be sentinel://host:port"),
    ("sentinel://a:99999", "the port must be a number"),
    ("sentinel://a/x", "the db must be a number"),
    ("sentinel://", "no host"),
    ("sentinel://a;sentinel://b/2", "put the db and credentials on the first entry"),
    ("sentinel://a;sentinel://:pw@b", "put the db and credentials on the first entry"),
    # Read otherwise by Celery's broker than by our clients (it would have used another db, or failed
    # after the worker's start-up ping): refused up front.
    (";sentinel://h1/2", "the scheme must be"),
    ("sentinel://h1;", "an empty or space-padded entry"),
    (" sentinel://h1:26379 ; sentinel://h2:26379 ", "without spaces"),
    ("sentinel://h/0?x=1", "no query or fragment"),
    ("sentinel://h:0", "the port must be a number from 1 to 65535"),
    ("sentinel://h/\u00b2", "the db must be a number"),
    ("sentinel://h/\u0663", "the db must be a number"),
    # Plain URLs are checked as strictly.
    ("", "must be a Redis URL"),
    ("   ", "must be a Redis URL"),
    ("http://h", "the scheme must be"),
    ("h1:6379", "the scheme must be"),
    ("sentinels://h1", "the scheme must be"),
    ("redis://h:abc/0", "the port must be a number"),
    ("redis://h:99999", "the port must be a number"),
    ("redis://h:6379/abc", "the db must be a number"),
    ("redis://h1;sentinel://h2", "a list of URLs"),
])
def test_a_malformed_redis_url_is_a_config_error_naming_the_variable(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=f"^CHAT_REDIS_URL: .*{says}"):
        load_settings(redis_url=url)


@pytest.mark.parametrize("url", ["sentinel://[::1]:26379/1;sentinel://h2", "SENTINEL://h1", "redis://:pw@h:6380/3",
                                 "rediss://h/0?ssl_cert_reqs=required", "unix:///tmp/r.sock", "redis://[::1]:6379/0"])
def test_well_formed_urls_pass(url: str) -> None:
    assert load_settings(redis_url=url).redis_url == url


@pytest.mark.parametrize("name", ["", "   ", "a b", "a;b"])
def test_a_sentinel_url_needs_a_master_name(name: str) -> None:
    with pytest.raises(ConfigError, match="^CHAT_REDIS_MASTER_NAME: "):
        load_settings(redis_url="sentinel://a", redis_master_name=name)


def test_a_blank_password_is_no_password() -> None:
    assert load_settings(redis_password="").redis_options()["password"] is None


def test_clients_made_before_a_failover_follow_it() -> None:
    """Sync and asyncio clients: writes, a registered Lua script (not replicated: loaded again on NOSCRIPT)
    and a blocking XREAD under way when the primary is SIGKILLed all carry on against the promoted replica."""
    cluster = SentinelCluster()
    try:
        r = sync_client(cluster.url)
        incr = r.register_script("return redis.call('INCR', KEYS[1])")
        assert incr(keys=["n"]) == 1
        r.xadd("s", {"k": "before"})

        async def read_across(ar: aredis.Redis) -> list[bytes]:
            seen: list[bytes] = []
            last = "0-0"
            while len(seen) < 2:  # a blocking read, resumed after the failover from the last entry seen
                try:
                    for _, entries in await ar.xread({"s": last}, block=500) or []:
                        for eid, fields in entries:
                            seen.append(fields[b"k"])
                            last = eid
                except redis.ConnectionError:
                    await asyncio.sleep(0.2)
            return seen

        async def run() -> list[bytes]:
            ar = async_client(cluster.url)
            assert await ar.set("a", 1)
            reader = asyncio.create_task(read_across(ar))
            await asyncio.sleep(0.3)
            old = await asyncio.to_thread(cluster.kill_primary)
            new = await asyncio.to_thread(cluster.wait_promoted, old)
            assert incr(keys=["n"]) == 2  # the sync client, its script and the replicated count, on `new`
            r.xadd("s", {"k": "after"})
            assert await ar.incr("a") == 2
            seen = await asyncio.wait_for(reader, 30)
            assert new != old and (await ar.info("server"))["tcp_port"] == new
            await ar.aclose()
            return seen

        assert asyncio.run(run()) == [b"before", b"after"]
        r.close()
    finally:
        cluster.close()


def lagging_sentinel(cluster: SentinelCluster, names: int) -> tuple[int, subprocess.Popen]:
    """A sentinel that names the node on port `names` as the primary, as one that has not heard of a failover
    yet names the old primary once that node is back as a replica (it would take a minute to see its
    mistake). Returns its port and process."""
    port = free_port()
    conf = Path(cluster.dir) / f"sentinel-lagging-{port}.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {cluster.dir}\n"
                    f"sentinel monitor {cluster.master_name} 127.0.0.1 {names} 1\n"
                    f"sentinel down-after-milliseconds {cluster.master_name} 60000\n")
    proc = subprocess.Popen(["redis-server", str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    s = redis.Redis(port=port, decode_responses=True)
    end = time.monotonic() + 20
    try:
        while True:  # until it answers, naming `names` as a primary that is up (what redis-py takes)
            try:
                m = s.sentinel_master(cluster.master_name)
                if int(m["port"]) == names and m["is_master"] and not (m["is_sdown"] or m["is_odown"]):
                    return port, proc
            except (redis.ConnectionError, redis.ResponseError):
                pass
            assert time.monotonic() < end, "the lagging sentinel did not start"
            time.sleep(0.05)
    finally:
        s.close()


def test_a_sentinel_naming_a_replica_as_the_primary_is_not_followed_to_it() -> None:
    """The first sentinel of the list names the replica (after a failover, a sentinel that has not heard of it
    names the old primary, back as an empty replica): a connection there read a replica's dataset (a reader
    was told "turn not found" for a turn that was then answered). Sync and asyncio clients, whose first
    command is a read, talk to the primary: the node a sentinel names must answer ROLE as a master."""
    cluster = SentinelCluster()
    proc: subprocess.Popen | None = None
    try:
        primary = cluster.primary_port()
        replica = next(p for p in cluster.data if p != primary)
        port, proc = lagging_sentinel(cluster, replica)
        url = f"sentinel://127.0.0.1:{port}/0;{cluster.url}"  # the lagging one is asked first

        r = sync_client(url)
        assert int(r.info("server")["tcp_port"]) == primary  # a read, on the primary
        assert r.set("k", "v") and r.get("k") == b"v"
        r.close()

        async def run() -> None:
            ar = async_client(url)
            assert int((await ar.info("server"))["tcp_port"]) == primary
            assert await ar.incr("n") == 1
            await ar.aclose()

        asyncio.run(run())
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(10)
        cluster.close()


def test_a_command_sent_again_after_a_drop_asks_the_sentinels_where_the_primary_is(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection drops under a command (the primary SIGKILLed under a reader's blocking XREAD); by the
    retry, the sentinels name another node, and the old primary's address answers again as a replica that has
    not synced (the failover test restarts the killed node at once). redis-py's retry reconnected to the
    address it had: the read answered from the stale replica ("turn not found" for a turn then answered).
    Sync and asyncio: the retry asks the sentinels (patched here to name `at`) and reads the primary's data."""
    old, new = RedisServer(), RedisServer()
    try:
        redis.Redis(port=old.port).set("k", "old")
        redis.Redis(port=new.port).set("k", "new")
        at = [old.port]

        def dropped_once(cls: type, is_async: bool) -> list[int]:
            real, drops = cls.read_response, [0]

            def drop(self: Any) -> None:
                drops[0] += 1
                at[0] = new.port  # the failover happened meanwhile; the old address is a replica now
                redis.Redis(port=old.port).replicaof("127.0.0.1", 1)  # its primary unreachable: stale data

            def read_response(self: Any, *args: Any, **kwargs: Any) -> Any:
                if not drops[0] and self.port == old.port:
                    drop(self)
                    self.disconnect()
                    raise redis.ConnectionError(DROPPED)
                return real(self, *args, **kwargs)

            async def aread_response(self: Any, *args: Any, **kwargs: Any) -> Any:
                if not drops[0] and self.port == old.port:
                    drop(self)
                    await self.disconnect()
                    raise redis.ConnectionError(DROPPED)
                return await real(self, *args, **kwargs)

            monkeypatch.setattr(cls, "read_response", aread_response if is_async else read_response)
            return drops

        def name_at(manager: Any, is_async: bool) -> None:
            async def adiscover(name: str) -> tuple[str, int]:
                return "127.0.0.1", at[0]

            monkeypatch.setattr(manager, "discover_master",
                                adiscover if is_async else (lambda name: ("127.0.0.1", at[0])))

        r = sync_client("sentinel://127.0.0.1:1/0")  # its sentinels are never asked: discover_master is patched
        name_at(r.connection_pool.sentinel_manager, False)
        assert r.ping()  # connected to `old`, the primary then
        drops = dropped_once(r.connection_pool.connection_class, False)
        assert r.get("k") == b"new" and drops == [1]
        r.close()
        monkeypatch.undo()

        redis.Redis(port=old.port).replicaof("NO", "ONE")
        at[0] = old.port

        async def run() -> None:
            ar = async_client("sentinel://127.0.0.1:1/0")
            name_at(ar.connection_pool.sentinel_manager, True)
            assert await ar.ping()
            drops = dropped_once(ar.connection_pool.connection_class, True)
            assert await ar.get("k") == b"new" and drops == [1]
            await ar.aclose()

        asyncio.run(run())
    finally:
        old.close()
        new.close()


def test_the_workers_broker_connection_keeps_its_guarded_transport_across_a_failover() -> None:
    """kombu's Connection switches to the next URL of the list on each failed connect and takes the transport
    from that URL's scheme: the worker's consumer had come back on kombu's plain Sentinel transport, without
    the guards (its next failover ended the worker). The failover strategy keeps the guarded one."""
    from worker.app import make_worker_app
    from worker.celery_workarounds import GuardedSentinelChannel

    cluster = SentinelCluster()
    try:
        app = make_worker_app(load_settings(redis_url=cluster.url))
        conn = app.connection_for_read()
        conn.ensure_connection(max_retries=3)
        assert isinstance(conn.default_channel, GuardedSentinelChannel)
        old = cluster.kill_primary()
        new = cluster.wait_promoted(old)
        for _ in range(4):  # every entry of the list, and round again
            conn.maybe_switch_next()
            assert conn.transport_cls == "chat-sentinel"
        conn.ensure_connection(max_retries=20, interval_start=0.2, interval_step=0.2)
        channel = conn.default_channel
        assert isinstance(channel, GuardedSentinelChannel)
        assert channel.client.info("server")["tcp_port"] == new  # every sentinel of the list still asked
        conn.release()
    finally:
        cluster.close()
