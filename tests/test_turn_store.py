"""Exactly-once at the Redis level: the worker's scripts (worker/turn_store.py) and the stream fencing,
against a real Redis with no worker. What a redelivery, a duplicate, a stale attempt, a lost reply
and the watchdog can and cannot do."""

from __future__ import annotations

import json
import time

import pytest
import redis

from producer.client import ChatClient, StartedTurn
from shared.keys import Keys
from shared.messages import ChatMessage, Role
from shared.wire import FinishReason, TurnResult, TurnStatus
from tests.conftest import tiny_settings
from worker.stream import Signal, StreamPublisher
from worker.turn_store import Claim, Commit, TurnStore

KEYS = Keys("chat")
QUEUE = "chat.tiny-neox"


@pytest.fixture
def client(r: redis.Redis, redis_url: str):
    c = ChatClient(tiny_settings(redis_url, queue_without_workers=True), r=r)
    yield c


def turns(r: redis.Redis, max_attempts: int = 3, worker: str = "w", lease_s: float = 10.0) -> TurnStore:
    return TurnStore(r, KEYS, max_attempts=max_attempts, worker=worker, lease_s=lease_s)


def new_turn(client: ChatClient, text: str = "hello") -> StartedTurn:
    return client.send(client.create_conversation("tiny-neox"), text)


def reply(turn: StartedTurn, text: str, attempt: int) -> tuple[str, str]:
    msg = ChatMessage(role=Role.assistant, text=text, turn_id=turn.turn_id)
    res = TurnResult(turn_id=turn.turn_id, conversation_id=turn.conversation_id, text=text,
                     finish_reason=FinishReason.end_key, prompt_tokens=1, completion_tokens=1, attempt=attempt)
    return msg.model_dump_json(), res.model_dump_json()


def commit(ts: TurnStore, turn: StartedTurn, attempt: int, text: str, delivery: str = "d") -> Commit:
    return ts.commit(turn.turn_id, attempt, delivery, [], *reply(turn, text, attempt))


def expire_lease(r: redis.Redis, tid: str) -> None:
    """What time does to a lease nobody renews (its worker died, froze or lost Redis)."""
    r.zadd(KEYS.running, {tid: 1.0}, xx=True)


def stream(r: redis.Redis, tid: str) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in f.items()} for _, f in r.xrange(KEYS.stream(tid))]


def assistant_texts(client: ChatClient, cid: str) -> list[str]:
    return [m.text for m in client.store.messages(cid) if m.role is Role.assistant]


def test_duplicate_delivery_never_appends_a_second_reply(r, client):
    turn = new_turn(client)
    ts = turns(r)
    lease = ts.begin(turn.turn_id, "d1")
    assert (lease.status, lease.attempt) == (Claim.ok, 1)
    assert commit(ts, turn, 1, "the reply", "d1") is Commit.done
    assert commit(ts, turn, 1, "the reply", "d1") is Commit.done  # the same commit sent again: nothing more
    # The same message delivered again (a duplicate, or a redelivery after the ack was lost):
    assert ts.begin(turn.turn_id, "d2").status is Claim.finished
    assert commit(ts, turn, 1, "the reply", "d2") is Commit.duplicate
    assert assistant_texts(client, turn.conversation_id) == ["the reply"]
    assert client.store.get(turn.conversation_id).busy is None
    st = client.store.turn(turn.turn_id)
    assert st.status is TurnStatus.done and "message" not in st.fields  # the kept task message goes with it


def test_a_redelivery_while_the_first_delivery_lives_is_skipped_and_takes_nothing_away(r, client):
    """The lost-turn bug: a turn redelivered while its first attempt was alive (a visibility timeout, or a
    dropped connection making kombu restore what it held) must not take the turn from the live attempt."""
    turn = new_turn(client)
    a, b = turns(r, worker="live"), turns(r, worker="second")
    assert a.begin(turn.turn_id, "d1").attempt == 1
    assert b.begin(turn.turn_id, "d2") == (b.begin(turn.turn_id, "d2"))  # idempotent, and ...
    assert b.begin(turn.turn_id, "d2").status is Claim.held  # ... held: the live delivery keeps it
    assert a.begin(turn.turn_id, "d1").status is Claim.ok  # the live delivery's own BEGIN, sent again
    st = client.store.turn(turn.turn_id)
    assert (st.status, st.attempt, st.fields["worker"]) == (TurnStatus.running, 1, "live")
    assert commit(a, turn, 1, "live reply", "d1") is Commit.done
    assert assistant_texts(client, turn.conversation_id) == ["live reply"]


def test_stale_attempt_finishing_late_cannot_overwrite(r, client):
    turn = new_turn(client)
    a, b = turns(r, worker="lost-worker"), turns(r, worker="second-worker")
    assert a.begin(turn.turn_id, "d1").attempt == 1  # attempt 1 starts, its worker goes silent ...
    expire_lease(r, turn.turn_id)  # ... long enough for its lease to run out
    assert b.begin(turn.turn_id, "d2").attempt == 2  # the turn is redelivered: attempt 2 owns it now
    assert commit(a, turn, 1, "stale text", "d1") is Commit.stale  # attempt 1 comes back before attempt 2 ends
    assert a.fail(turn.turn_id, 1, "stale error") == -1  # nor can it fail the turn
    assert commit(b, turn, 2, "fresh text", "d2") is Commit.done
    assert commit(a, turn, 1, "stale text", "d1") is Commit.duplicate  # ... or after it ended
    assert assistant_texts(client, turn.conversation_id) == ["fresh text"]
    st = client.store.turn(turn.turn_id)
    assert (st.status, st.attempt, st.result.text, st.result.attempt) == (TurnStatus.done, 2, "fresh text", 2)
    assert st.fields["worker"] == "second-worker" and st.fields["lost"] == "1"


def test_interrupted_attempt_leaves_a_new_start_marker_readers_restart_on(r, client):
    turn = new_turn(client)
    ts = turns(r)
    pub = StreamPublisher(r, KEYS, flush_ms=0)
    ts.begin(turn.turn_id, "d1")
    codes: list[Signal] = []
    one = pub.register(turn.turn_id, 1, codes.append)
    pub.append(one, "partial text of attempt 1")
    pub.flush()
    pub.take(one)  # attempt 1 is cut off here (worker killed)
    expire_lease(r, turn.turn_id)
    ts.begin(turn.turn_id, "d2")  # redelivered
    two = pub.register(turn.turn_id, 2, codes.append)
    pub.append(two, "attempt 2 ")
    tail = pub.take(two)
    assert ts.commit(turn.turn_id, 2, "d2", tail, *reply(turn, "attempt 2 says hi", 2)) is Commit.done
    kinds = [(e.get("ev", "delta"), e["a"]) for e in stream(r, turn.turn_id)]
    assert kinds == [("start", "1"), ("delta", "1"), ("start", "2"), ("delta", "2"), ("done", "2")]
    attempts = [ev.attempt for ev in client.events(turn.turn_id, timeout=5) if ev.kind == "start"]
    assert attempts == [1, 2] and codes == []


def test_stale_attempt_cannot_stream_into_the_new_one(r, client):
    turn = new_turn(client)
    ts = turns(r)
    pub = StreamPublisher(r, KEYS, flush_ms=0)
    ts.begin(turn.turn_id, "d1")
    signals: list[Signal] = []
    old = pub.register(turn.turn_id, 1, signals.append)
    expire_lease(r, turn.turn_id)
    ts.begin(turn.turn_id, "d2")  # attempt 2 takes the turn while attempt 1 is still generating
    pub.append(old, "late text from attempt 1")
    pub.flush()
    assert signals == [Signal.stale]  # attempt 1 is told to stop ...
    assert all(e.get("t") != "late text from attempt 1" for e in stream(r, turn.turn_id))  # ... and wrote nothing


def test_two_attempts_on_one_worker_stream_under_their_own_registrations(r, client):
    """Same-worker duplicate: each attempt has its own registration; the stale one is told, the live one's
    text is neither relabelled nor dropped."""
    turn = new_turn(client)
    ts = turns(r)
    pub = StreamPublisher(r, KEYS, flush_ms=10_000)
    ts.begin(turn.turn_id, "d1")
    first_signals: list[Signal] = []
    first = pub.register(turn.turn_id, 1, first_signals.append)
    pub.append(first, "from attempt one")
    expire_lease(r, turn.turn_id)
    ts.begin(turn.turn_id, "d2")
    second = pub.register(turn.turn_id, 2, lambda s: None)
    pub.append(second, "from attempt two")
    pub.flush()
    assert first_signals == [Signal.stale]
    assert [(e["a"], e["t"]) for e in stream(r, turn.turn_id) if "t" in e] == [("2", "from attempt two")]
    assert pub.take(first) == [] and pub.take(second) == []


def test_a_flush_sent_twice_appends_once(r, client):
    """A flush whose reply was lost is sent again with the same sequence number: nothing is written twice,
    and what was appended meanwhile is written once, after it."""
    turn = new_turn(client)
    turns(r).begin(turn.turn_id, "d1")
    pub = StreamPublisher(r, KEYS, flush_ms=10_000)
    a = pub.register(turn.turn_id, 1, lambda s: None)
    pub.append(a, "one ")
    pub.flush()
    a.unsure, a.seq = [(1, "one ")], 1  # as if that flush's reply had been lost
    pub.append(a, "two")
    pub.flush()
    assert [e["t"] for e in stream(r, turn.turn_id) if "t" in e] == ["one ", "two"]


def test_failure_takes_the_user_message_back_out(r, client):
    turn = new_turn(client)
    ts = turns(r)
    lease = ts.begin(turn.turn_id, "d1")
    assert ts.fail(turn.turn_id, lease.attempt, "top_k: too large") == 1
    assert client.store.messages(turn.conversation_id) == []
    assert client.store.get(turn.conversation_id).busy is None
    st = client.store.turn(turn.turn_id)
    assert (st.status, st.error) == (TurnStatus.failed, "top_k: too large")
    assert stream(r, turn.turn_id)[-1] == {"ev": "error", "a": "1", "error": "top_k: too large"}
    assert ts.fail(turn.turn_id, lease.attempt, "again") == 0  # once
    assert r.ttl(KEYS.turn(turn.turn_id)) > 0 and r.ttl(KEYS.stream(turn.turn_id)) > 0
    assert not r.zscore(KEYS.running, turn.turn_id) and not r.zscore(KEYS.queued, turn.turn_id)


def test_a_bad_copy_cannot_fail_a_turn_a_live_delivery_is_generating(r, client):
    turn = new_turn(client)
    ts = turns(r)
    ts.begin(turn.turn_id, "d1")
    assert ts.fail(turn.turn_id, 0, "invalid payload: a garbled duplicate") == -1
    assert client.store.turn(turn.turn_id).status is TurnStatus.running


def test_fail_creates_nothing_for_an_unknown_turn(r):
    before = set(r.keys("*"))
    assert turns(r).fail("no-such-turn", 0, "invalid payload") == -2
    assert set(r.keys("*")) == before


def test_poison_turn_is_given_up_after_max_attempts_whose_worker_vanished(r, client):
    """A turn whose worker dies every time (it never commits or fails) is failed with the reason on the
    delivery after max_attempts lost ones, and its user message is taken out."""
    turn = new_turn(client)
    ts = turns(r, max_attempts=3)
    attempts = []
    for i in range(3):
        attempts.append(ts.begin(turn.turn_id, f"d{i}").attempt)
        expire_lease(r, turn.turn_id)
        assert ts.rescue_expired() == [turn.turn_id]  # the watchdog queues it again
    assert attempts == [1, 2, 3]
    assert ts.begin(turn.turn_id, "d3").status is Claim.poison
    st = client.store.turn(turn.turn_id)
    assert st.status is TurnStatus.failed and "gave up after 3 attempts" in st.error
    assert client.store.messages(turn.conversation_id) == [] and client.store.get(turn.conversation_id).busy is None
    assert stream(r, turn.turn_id)[-1]["ev"] == "error"
    assert ts.begin(turn.turn_id, "d4").status is Claim.finished  # and it stays given up


def test_hand_back_queues_the_kept_message_again_without_counting_a_loss(r, client):
    turn = new_turn(client)
    kept = r.hget(KEYS.turn(turn.turn_id), "message")
    assert r.rpop(QUEUE) == kept  # a worker took it
    ts = turns(r)
    ts.begin(turn.turn_id, "d1")
    assert ts.hand_back(turn.turn_id, 2) == -1  # fenced: not attempt 2's to hand back
    assert ts.hand_back(turn.turn_id, 1) == 1
    st = client.store.turn(turn.turn_id)
    assert (st.status, st.fields.get("worker"), st.fields["lost"]) == (TurnStatus.queued, None, "0")
    assert r.lrange(QUEUE, 0, -1) == [kept] and not r.zscore(KEYS.running, turn.turn_id)
    assert ts.begin(turn.turn_id, "d2").attempt == 2


def test_watchdog_requeues_only_turns_whose_lease_expired(r, client):
    live, lost = new_turn(client, "live"), new_turn(client, "lost")
    r.delete(QUEUE)  # both taken by workers
    ts = turns(r)
    ts.begin(live.turn_id, "d1")
    ts.begin(lost.turn_id, "d2")
    expire_lease(r, lost.turn_id)
    assert ts.rescue_expired() == [lost.turn_id]
    assert ts.rescue_expired() == []  # once
    assert client.store.turn(live.turn_id).status is TurnStatus.running
    assert client.store.turn(lost.turn_id).status is TurnStatus.queued
    assert r.lrange(QUEUE, 0, -1) == [r.hget(KEYS.turn(lost.turn_id), "message")]


def test_watchdog_requeues_a_queued_turn_whose_message_was_lost(r, client):
    on_queue, in_delivery, lost, stale_delivery = (new_turn(client, t) for t in ("a", "b", "c", "d"))
    msgs = {t.turn_id: r.hget(KEYS.turn(t.turn_id), "message") for t in (in_delivery, lost, stale_delivery)}
    for t in (in_delivery, lost, stale_delivery):
        r.lrem(QUEUE, 1, msgs[t.turn_id])
    now = time.time()
    # kombu's unacked bookkeeping: a fresh delivery (its worker begins it any moment) and one that is old
    r.hset("unacked", mapping={"fresh": json.dumps([json.loads(msgs[in_delivery.turn_id]), "", QUEUE]),
                               "old": json.dumps([json.loads(msgs[stale_delivery.turn_id]), "", QUEUE])})
    r.zadd("unacked_index", {"fresh": now, "old": now - 600})
    ts = turns(r)
    assert ts.requeue_lost("unacked", "unacked_index", min_age_s=30) == []  # nothing queued 30 s yet
    r.zadd(KEYS.queued, {t.turn_id: now - 60 for t in (on_queue, in_delivery, lost, stale_delivery)})
    r.delete(f"{KEYS.prefix}:lock:lost")
    assert sorted(ts.requeue_lost("unacked", "unacked_index", min_age_s=30)) == sorted(
        [lost.turn_id, stale_delivery.turn_id])
    assert r.lrange(QUEUE, 0, -1)[-2:] and r.llen(QUEUE) == 3
    assert ts.requeue_lost("unacked", "unacked_index", min_age_s=30) == []  # one scan per lock period


def test_commit_for_a_deleted_conversation_writes_nothing_for_it(r, client):
    turn = new_turn(client)
    ts = turns(r)
    ts.begin(turn.turn_id, "d1")
    client.store.delete(turn.conversation_id)
    assert r.hget(KEYS.turn(turn.turn_id), "cancel") == b"1"  # its worker is told to stop
    assert commit(ts, turn, 1, "the partial reply", "d1") is Commit.done
    assert not r.exists(KEYS.conv(turn.conversation_id), KEYS.messages(turn.conversation_id))
    assert r.ttl(KEYS.turn(turn.turn_id)) > 0 and r.ttl(KEYS.stream(turn.turn_id)) > 0


def test_dead_letter_keeps_payload_and_reason(r):
    ts = turns(r)
    ts.dead_letter({"turn_id": "x"}, "invalid payload: messages: Field required")
    (entry,) = [json.loads(x) for x in r.lrange(KEYS.dead, 0, -1)]
    assert entry["payload"] == {"turn_id": "x"} and entry["reason"].startswith("invalid payload")
    assert entry["worker"] == "w" and entry["at"] <= time.time()
