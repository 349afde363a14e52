"""producer/client.py: a START whose reply was lost (Redis ran it, then the connection dropped: the primary
was killed under it) is settled before the caller hears anything. A turn still queued is withdrawn (the
caller gets Unavailable and nothing of the turn stays); a turn a worker has claimed already cannot be taken
back and is reported as started (it used to be reported Unavailable too: the caller sent the message again
and both turns were answered, as the failover test once saw); a START that never ran leaves nothing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from producer.client import ChatClient
from shared.errors import Unavailable
from shared.keys import Keys
from tests.conftest import tiny_settings

KEYS = Keys("chat")
LOST = "Connection closed by server."


@pytest.fixture
def client(r: redis.Redis, redis_url: str) -> Iterator[ChatClient]:
    c = ChatClient(tiny_settings(redis_url, queue_without_workers=True))
    yield c
    c.close()


def reply_lost(client: ChatClient, monkeypatch: pytest.MonkeyPatch, runs: bool,
               meanwhile: Callable[[str], None] = lambda tid: None) -> list[str]:
    """START raises a connection error after running (`runs`) or without running; `meanwhile(turn id)` happens
    between the two (a worker claiming the turn). Returns the turn ids START was called with."""
    real, tids = client.store.start, []

    def start(**kw: Any) -> Any:
        tids.append(kw["turn_id"])
        if runs:
            real(**kw)
            meanwhile(kw["turn_id"])
        raise redis.ConnectionError(LOST)

    monkeypatch.setattr(client.store, "start", start)
    return tids


def test_a_turn_a_worker_claimed_before_the_lost_reply_was_settled_is_reported_started(
        client: ChatClient, r: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    cid = client.create_conversation("tiny-neox")

    def claim(tid: str) -> None:  # what BEGIN does to the record (the worker popped the turn at once)
        r.hset(KEYS.turn(tid), mapping={"status": "running", "attempt": 1, "worker": "w1"})

    tids = reply_lost(client, monkeypatch, runs=True, meanwhile=claim)
    turn = client.send(cid, "hello")  # not Unavailable: the turn goes on, its reply will come
    assert tids == [turn.turn_id] and turn.conversation_id == cid and turn.queue == "chat.tiny-neox"
    assert r.hget(KEYS.turn(turn.turn_id), "status") == b"running"
    assert client.store.get(cid).busy == turn.turn_id  # a second send would be Busy, not a second turn
    assert [m.text for m in client.store.messages(cid)] == ["hello"]


def test_a_queued_turn_whose_start_reply_was_lost_is_withdrawn_and_leaves_nothing(
        client: ChatClient, r: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    cid = client.create_conversation("tiny-neox")
    tids = reply_lost(client, monkeypatch, runs=True)
    with pytest.raises(Unavailable):
        client.send(cid, "hello")
    st = client.store.turn(tids[0])
    assert st.status.value == "failed" and "Redis error while starting the turn" in (st.error or "")
    assert client.store.messages(cid) == [] and client.store.get(cid).busy is None
    assert r.llen("chat.tiny-neox") == 0  # its task message left the queue: no worker answers it
    again = client.store.withdraw(tids[0], st.error or "")  # WITHDRAW run twice (a lost reply) says the same
    assert again.status.value == "withdrawn"


def test_a_start_that_never_ran_leaves_nothing(client: ChatClient, r: redis.Redis,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    cid = client.create_conversation("tiny-neox")
    tids = reply_lost(client, monkeypatch, runs=False)
    with pytest.raises(Unavailable):
        client.send(cid, "hello")
    assert not r.exists(KEYS.turn(tids[0])) and client.store.messages(cid) == []
