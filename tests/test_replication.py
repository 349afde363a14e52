"""shared/replication.py against real Redis: with no replica attached, a write that asks for one waits the
timeout, still stands, and is counted short (sync and asyncio); asking for none sends the script alone; a
pipeline that meets NOSCRIPT (sent again by redis-py to a promoted replica that lacks the script) is sent once
more, loading it."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
from redis.client import Pipeline

from config.redis_clients import async_client
from shared.replication import Replication

INCR = "return redis.call('INCR', KEYS[1])"


def test_a_write_waits_for_replicas_then_stands_counted_short(r: redis.Redis) -> None:
    script = r.register_script(INCR)
    rep = Replication(replicas=1, timeout_ms=150)
    t0 = time.monotonic()
    assert rep.run(r, script, ["n"], []) == 1
    assert time.monotonic() - t0 >= 0.14  # WAIT ran on the writing connection: it waited for the replica
    assert rep.short == 1 and int(r.get("n")) == 1


def test_no_replicas_asked_is_the_script_alone(r: redis.Redis) -> None:
    script = r.register_script(INCR)
    rep = Replication()
    t0 = time.monotonic()
    assert [rep.run(r, script, ["n"], []) for _ in range(3)] == [1, 2, 3]
    assert time.monotonic() - t0 < 0.14 and rep.short == 0


def test_an_asyncio_write_waits_for_replicas_too(redis_url: str, r: redis.Redis) -> None:
    rep = Replication(replicas=1, timeout_ms=150)

    async def run() -> tuple[int, float]:
        ar = async_client(redis_url)
        try:
            script = ar.register_script(INCR)
            t0 = time.monotonic()
            return await rep.arun(ar, script, ["n"], []), time.monotonic() - t0
        finally:
            await ar.aclose()

    reply, took = asyncio.run(run())
    assert reply == 1 and took >= 0.14 and rep.short == 1 and int(r.get("n")) == 1


def test_a_script_the_node_lacks_when_the_pipeline_arrives_is_loaded_and_run_once(
        r: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first pipeline's scripts were loaded on the old primary (its load is skipped here, the script cache
    flushed): the node answers NOSCRIPT, the script did not run; it is loaded and run, once."""
    script = r.register_script(INCR)
    r.script_flush()
    real, loads = Pipeline.load_scripts, []

    def load_scripts(self: Pipeline) -> None:
        loads.append(1)
        if len(loads) > 1:
            real(self)

    monkeypatch.setattr(Pipeline, "load_scripts", load_scripts)
    rep = Replication(replicas=1, timeout_ms=10)
    assert rep.run(r, script, ["n"], []) == 1 and int(r.get("n")) == 1 and len(loads) == 2
