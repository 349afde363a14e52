"""shared/arrivals.py: producers announce a turn while they check it; an idle worker counts what is queued
and announced on its queue (real Redis, db flushed around each test)."""

import time

import pytest

from config.celery import queue_name, worker_queue
from producer.client import ChatClient, TurnRequest
from shared.arrivals import Arrivals
from shared.errors import Unavailable
from shared.keys import Keys
from shared.sampling import SamplingParams
from tests.conftest import tiny_settings

QUEUE = "chat.tiny-neox"


def test_backlog_counts_queued_deliveries_and_live_announcements(r):
    a = Arrivals(r, Keys("chat"))
    assert a.backlog(QUEUE) == 0
    r.lpush(QUEUE, "m1", "m2")
    a.announce(QUEUE, "t1")
    a.announce(QUEUE, "t2")
    a.announce("chat.other", "t3")  # another model's queue
    assert a.backlog(QUEUE) == 4
    a.withdraw(QUEUE, "t1")
    assert a.backlog(QUEUE) == 3
    assert 0 < r.pttl(Keys("chat").arriving(QUEUE)) <= 2000  # the set itself goes when producers stop


def test_an_announcement_whose_producer_died_stops_counting(r, monkeypatch):
    monkeypatch.setattr("shared.arrivals.ANNOUNCE_TTL_S", 0.05)
    a = Arrivals(r, Keys("chat"))
    a.announce(QUEUE, "gone")
    assert a.backlog(QUEUE) == 1
    time.sleep(0.1)
    assert a.backlog(QUEUE) == 0
    a.announce(QUEUE, "next")  # and the next announcement sweeps it out
    assert r.zrange(Keys("chat").arriving(QUEUE), 0, -1) == [b"next"]


def test_a_turn_is_announced_while_checked_and_not_after_it_is_queued(r, redis_url):
    client = ChatClient(tiny_settings(redis_url, queue_without_workers=True))
    key = client.keys.arriving(queue_name(client.settings, "tiny-neox"))
    seen: list[list[bytes]] = []
    fit = client._fit

    def spy(*args, **kwargs):  # the check (fitting with the model's tokenizer) runs after the announcement
        seen.append(r.zrange(key, 0, -1))
        return fit(*args, **kwargs)

    client._fit = spy
    started = client.start_turn(TurnRequest("hi", SamplingParams(), model="tiny-neox"))
    assert seen and seen[0] == [started.turn_id.encode()]
    assert r.zcard(key) == 0 and r.llen(queue_name(client.settings, "tiny-neox")) == 1  # START took it off
    client.close()


def test_a_turn_refused_after_its_announcement_is_withdrawn(r, redis_url):
    client = ChatClient(tiny_settings(redis_url))  # no live worker serves tiny-neox here: refused
    with pytest.raises(Unavailable):
        client.start_turn(TurnRequest("hi", SamplingParams(), model="tiny-neox"))
    assert r.zcard(client.keys.arriving(queue_name(client.settings, "tiny-neox"))) == 0
    assert not r.keys("chat:turn:*")
    client.close()


def test_backlog_counts_every_queue_a_worker_consumes(r):
    a = Arrivals(r, Keys("chat"))
    own = f"{QUEUE}.w.celery@x"
    r.lpush(QUEUE, "m1")
    r.lpush(own, "m2", "m3")
    a.announce(own, "t1")
    a.announce(QUEUE, "t2")
    assert a.backlog(QUEUE, own) == 5 and a.backlog(QUEUE) == 2 and a.backlog(own) == 3


def test_a_turn_routed_to_a_worker_is_announced_on_that_workers_own_queue(r, redis_url):
    from shared.cards import WorkerReport
    from worker.presence import Presence

    keys = Keys("chat")
    rep = WorkerReport(name="celery@x", model="tiny-neox", sequence_length=256, slots=4, own_queue=True)
    Presence(r, keys, rep).heartbeat(0)
    client = ChatClient(tiny_settings(redis_url))
    cid = client.create_conversation("tiny-neox")
    r.hset(keys.conv(cid), "worker", "celery@x")  # it answered the last turn
    own = worker_queue(client.settings, "tiny-neox", "celery@x")
    seen: list[list[bytes]] = []
    fit = client._fit

    def spy(*args, **kwargs):
        seen.append(r.zrange(keys.arriving(own), 0, -1))
        return fit(*args, **kwargs)

    client._fit = spy
    started = client.send(cid, "hi")
    assert seen and seen[0] == [started.turn_id.encode()] and started.queue == own
    assert r.zcard(keys.arriving(own)) == 0 and r.llen(own) == 1  # START took it off
    client.close()
