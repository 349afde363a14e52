"""producer/reader.py: a reader rides out connections that keep being dropped (Redis answers, only its
blocking reads are cut), and gives up only on a Redis that does not answer at all; with writes that wait
for replicas, it reports a turn's end only as the primary holds it once a replica could (an end a failover
took back, or read from a node behind the primary, is not reported: the turn is followed on)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import redis

from config.redis_clients import async_client
from producer.reader import EventKind, StreamEvent, afollow, follow
from shared.keys import Keys
from shared.replication import Replication
from shared.wire import FinishReason, TurnResult

KEYS = Keys("chat")
NAME = "reader-under-test"


def kill_named_connections(r: redis.Redis, stop: threading.Event, every_s: float) -> int:
    """Close every connection the reader opens, each `every_s` (as CLIENT KILL or a proxy would)."""
    kills = 0
    while not stop.wait(every_s):
        for c in r.client_list():
            if c.get("name") == NAME:
                try:
                    r.client_kill_filter(_id=c["id"])
                    kills += 1
                except redis.ResponseError:  # it closed meanwhile
                    pass
    return kills


async def read_all(url: str, turn_id: str, outage_s: float) -> list:
    ar = async_client(f"{url}?client_name={NAME}")
    try:
        return [ev async for ev in afollow(ar, KEYS, turn_id, lambda q, t: asyncio.sleep(0, 1), outage_s=outage_s)
                if ev is not None]
    finally:
        await ar.aclose()


def test_blocking_reads_cut_again_and_again_are_not_an_outage(r: redis.Redis, redis_url: str) -> None:
    """Every connection the reader opens is closed within 0.15 s for 9.5 s while the turn writes nothing:
    each blocking read fails all its retries (about 4 s each), yet Redis answers, so the reader keeps
    waiting past its 3 s outage limit and gets the turn's end (it used to report 'Redis unavailable' and
    stop: a /v1 client under connection churn got an error for a turn that finished)."""
    tid = "t-dropped"
    r.hset(KEYS.turn(tid), mapping={"status": "running", "attempt": 1})
    result = TurnResult(turn_id=tid, conversation_id="c", text="hi", finish_reason=FinishReason.end_key,
                        prompt_tokens=3, completion_tokens=1)
    stop = threading.Event()
    kills: list[int] = []
    killer = threading.Thread(target=lambda: kills.append(kill_named_connections(r, stop, 0.15)))

    def finish_later() -> None:
        time.sleep(9.5)
        stop.set()
        killer.join()
        r.xadd(KEYS.stream(tid), {"ev": "start", "a": 1})
        r.xadd(KEYS.stream(tid), {"ev": "done", "a": 1, "result": result.model_dump_json()})
        r.hset(KEYS.turn(tid), mapping={"status": "done", "result": result.model_dump_json()})

    killer.start()
    writer = threading.Thread(target=finish_later)
    writer.start()
    events = asyncio.run(read_all(redis_url, tid, outage_s=3))
    writer.join()
    assert kills and kills[0] >= 10  # the reader's connections really were cut, over and over
    assert [e.kind for e in events] == [EventKind.start, EventKind.done], [(e.kind, e.error) for e in events]
    assert events[-1].result == result


def test_a_redis_that_does_not_answer_ends_the_read_with_an_error_naming_the_outage() -> None:
    events = asyncio.run(read_all("redis://127.0.0.1:1/0", "t-any", outage_s=0.5))
    assert [e.kind for e in events] == [EventKind.error]
    assert "Redis unavailable for 0.5s" in events[0].error and "the turn goes on" in events[0].error


def no_position(queue: str, turn_id: str) -> int:
    return 0


def read_sync(r: Any, turn_id: str, rep: Replication) -> list[StreamEvent]:
    return [ev for ev in follow(r, KEYS, turn_id, no_position, timeout=30, replication=rep) if ev is not None]


def read_async(url: str, turn_id: str, rep: Replication) -> list[StreamEvent]:
    async def run() -> list[StreamEvent]:
        ar = async_client(url)
        try:
            return [ev async for ev in afollow(ar, KEYS, turn_id, lambda q, t: asyncio.sleep(0, 0), replication=rep)
                    if ev is not None]
        finally:
            await ar.aclose()

    return asyncio.run(run())


def a_result(tid: str, text: str, attempt: int) -> TurnResult:
    return TurnResult(turn_id=tid, conversation_id="c", text=text, finish_reason=FinishReason.length,
                      prompt_tokens=3, completion_tokens=2, attempt=attempt)


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_failure_the_primary_does_not_hold_is_not_reported_and_the_turn_is_followed_to_its_reply(
        r: redis.Redis, redis_url: str, flavour: str) -> None:
    """The reader read attempt 1's failure, but the primary holds the turn running (a failover took the failure
    back before a replica had it: the turn then runs again and is answered). It used to end with the error, and
    a client told "failed" saw the turn answered; it now reports the reply attempt 2 commits."""
    tid = f"t-taken-back-{flavour}"
    r.hset(KEYS.turn(tid), mapping={"status": "running", "attempt": 1})
    r.xadd(KEYS.stream(tid), {"ev": "start", "a": 1})
    r.xadd(KEYS.stream(tid), {"a": 1, "t": "ab"})
    r.xadd(KEYS.stream(tid), {"ev": "error", "a": 1, "error": "generation failed: boom"})
    result = a_result(tid, "xy", 2)

    def answer_later() -> None:  # attempt 2, on the promoted replica
        time.sleep(1.0)
        r.hset(KEYS.turn(tid), mapping={"status": "running", "attempt": 2})
        r.xadd(KEYS.stream(tid), {"ev": "start", "a": 2})
        r.xadd(KEYS.stream(tid), {"a": 2, "t": "xy"})
        r.hset(KEYS.turn(tid), mapping={"status": "done", "result": result.model_dump_json()})
        r.xadd(KEYS.stream(tid), {"ev": "done", "a": 2, "result": result.model_dump_json()})

    writer = threading.Thread(target=answer_later)
    writer.start()
    rep = Replication(replicas=1, timeout_ms=50)  # this Redis has no replica: each confirmation waits 50 ms
    events = read_sync(r, tid, rep) if flavour == "sync" else read_async(redis_url, tid, rep)
    writer.join()
    kinds = [e.kind for e in events]
    assert kinds == [EventKind.start, EventKind.delta, EventKind.start, EventKind.delta, EventKind.done], events
    assert events[-1].result == result and rep.short == 2  # both ends were confirmed behind a WAIT


class Behind:
    """A client whose first read of a turn's record answers as a node that lacks it (a replica not synced yet:
    where a sentinel that had not heard of a failover sent a connection)."""

    def __init__(self, r: redis.Redis):
        self.r, self.stale = r, 1

    def hmget(self, key: str, fields: Any) -> list[Any]:
        if self.stale:
            self.stale -= 1
            return [None] * len(fields)
        return self.r.hmget(key, fields)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.r, name)


def test_no_such_turn_is_reported_only_when_the_primary_has_none(r: redis.Redis) -> None:
    """A missing record read elsewhere than on the primary is not "not found": the turn is read on to its end;
    a turn the primary has no record of is."""
    tid = "t-behind"
    result = a_result(tid, "hi", 1)
    r.hset(KEYS.turn(tid), mapping={"status": "done", "attempt": 1, "result": result.model_dump_json()})
    r.xadd(KEYS.stream(tid), {"ev": "start", "a": 1})
    r.xadd(KEYS.stream(tid), {"ev": "done", "a": 1, "result": result.model_dump_json()})
    rep = Replication(replicas=1, timeout_ms=50)
    events = read_sync(Behind(r), tid, rep)
    assert [e.kind for e in events] == [EventKind.start, EventKind.done] and events[-1].result == result, events

    events = read_sync(r, "t-none", rep)
    assert [e.kind for e in events] == [EventKind.error] and "not found" in (events[0].error or "")
