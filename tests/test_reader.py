"""producer/reader.py: a reader rides out connections that keep being dropped (Redis answers, only its
blocking reads are cut), and gives up only on a Redis that does not answer at all."""

from __future__ import annotations

import asyncio
import threading
import time

import redis

from config.redis_clients import async_client
from producer.reader import EventKind, afollow
from shared.keys import Keys
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
