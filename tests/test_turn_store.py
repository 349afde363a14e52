"""Exactly-once at the Redis level: the BEGIN / COMMIT / FAIL scripts and the stream fencing, against a
real Redis with no worker. What a redelivery, a duplicate or a late stale attempt can and cannot do."""

from __future__ import annotations

import json
import time

import pytest
import redis

from producer.client import ChatClient
from producer.store import ConversationStore
from shared.keys import Keys
from shared.messages import ChatMessage, Role
from shared.sampling import SamplingParams
from shared.wire import FinishReason, GenerateTask, TurnResult
from tests.conftest import tiny_settings
from worker.stream import STALE, StreamPublisher
from worker.turn_store import TurnStore

KEYS = Keys("chat")


@pytest.fixture
def store(r: redis.Redis) -> ConversationStore:
    return ConversationStore(r, KEYS)


def turns(r: redis.Redis, max_attempts: int = 3, worker: str = "w") -> TurnStore:
    return TurnStore(r, KEYS, max_attempts=max_attempts, worker=worker)


def new_turn(store: ConversationStore, text: str = "hello") -> GenerateTask:
    cid = store.create("tiny-neox")
    task = store.add_user_turn(cid, text, SamplingParams())
    store.mark_published(task)
    return task


def reply(task: GenerateTask, text: str, attempt: int) -> tuple[str, str]:
    msg = ChatMessage(role=Role.assistant, text=text, turn_id=task.turn_id)
    res = TurnResult(turn_id=task.turn_id, conversation_id=task.conversation_id, text=text,
                     finish_reason=FinishReason.end_key, prompt_tokens=1, completion_tokens=1, attempt=attempt)
    return msg.model_dump_json(), res.model_dump_json()


def commit(ts: TurnStore, task: GenerateTask, attempt: int, text: str) -> int:
    return ts.commit(task.turn_id, task.conversation_id, attempt, "", *reply(task, text, attempt))


def stream(r: redis.Redis, tid: str) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in f.items()} for _, f in r.xrange(KEYS.stream(tid))]


def assistant_texts(store: ConversationStore, cid: str) -> list[str]:
    return [m.text for m in store.messages(cid) if m.role is Role.assistant]


def test_duplicate_delivery_never_appends_a_second_reply(r, store):
    task = new_turn(store)
    ts = turns(r)
    lease = ts.begin(task.turn_id)
    assert (lease.status, lease.attempt) == ("ok", 1)
    assert commit(ts, task, 1, "the reply") == 1
    # The same message delivered again (a duplicate, or a redelivery after the ack was lost):
    assert ts.begin(task.turn_id).status == "finished"
    # ... and even a duplicate commit of the same attempt is refused.
    assert commit(ts, task, 1, "the reply") == 0
    assert assistant_texts(store, task.conversation_id) == ["the reply"]
    assert store.get(task.conversation_id).busy is None
    assert store.turn(task.turn_id).status == "done"


def test_stale_attempt_finishing_late_cannot_overwrite(r, store):
    task = new_turn(store)
    a, b = turns(r, worker="lost-worker"), turns(r, worker="second-worker")
    assert a.begin(task.turn_id).attempt == 1  # attempt 1 starts, its worker goes silent
    assert b.begin(task.turn_id).attempt == 2  # the turn is redelivered: attempt 2 owns it now
    assert commit(a, task, 1, "stale text") == -1  # attempt 1 comes back before attempt 2 ends: refused
    assert a.fail(task.turn_id, task.conversation_id, 1, "stale error") == -1  # nor can it fail the turn
    assert commit(b, task, 2, "fresh text") == 1
    assert commit(a, task, 1, "stale text") == 0  # ... or after it ended: already done
    assert assistant_texts(store, task.conversation_id) == ["fresh text"]
    st = store.turn(task.turn_id)
    assert (st.status, st.attempt, st.result.text, st.result.attempt) == ("done", 2, "fresh text", 2)
    assert r.hget(KEYS.turn(task.turn_id), "worker") == b"second-worker"


def test_interrupted_attempt_leaves_a_new_start_marker_readers_restart_on(r, store, redis_url):
    task = new_turn(store)
    ts = turns(r)
    pub = StreamPublisher(r, KEYS, flush_ms=0)
    ts.begin(task.turn_id)
    codes: list[int] = []
    pub.register(task.turn_id, 1, codes.append)
    pub.append(task.turn_id, "partial text of attempt 1")
    pub.take(task.turn_id)  # attempt 1 is cut off here (worker killed or shut down cold)
    ts.begin(task.turn_id)  # redelivered
    pub.register(task.turn_id, 2, codes.append)
    pub.append(task.turn_id, "attempt 2 ")
    tail = pub.take(task.turn_id)
    assert ts.commit(task.turn_id, task.conversation_id, 2, tail, *reply(task, "attempt 2 says hi", 2)) == 1
    events = stream(r, task.turn_id)
    kinds = [(e.get("ev", "delta"), e["a"]) for e in events]
    assert kinds == [("start", "1"), ("delta", "1"), ("start", "2"), ("delta", "2"), ("done", "2")]
    # What a client shows: everything after the last start marker, which is the committed reply's attempt.
    client = ChatClient(tiny_settings(redis_url), r=r)
    shown, attempts = "", []
    for ev in client.events(task.turn_id, timeout=5):
        if ev.kind == "start":
            shown = ""
            attempts.append(ev.attempt)
        elif ev.kind == "delta":
            shown += ev.text
        elif ev.kind == "done":
            assert ev.result is not None and ev.result.attempt == attempts[-1] == 2
    assert attempts == [1, 2] and shown == "attempt 2 "
    client.close()


def test_stale_attempt_cannot_stream_into_the_new_one(r, store):
    task = new_turn(store)
    ts = turns(r)
    pub = StreamPublisher(r, KEYS, flush_ms=0)
    ts.begin(task.turn_id)
    signals: list[int] = []
    pub.register(task.turn_id, 1, signals.append)
    ts.begin(task.turn_id)  # attempt 2 takes the turn while attempt 1 is still generating
    pub.append(task.turn_id, "late text from attempt 1")
    assert signals == [STALE]  # attempt 1 is told to stop ...
    assert all(e.get("t") != "late text from attempt 1" for e in stream(r, task.turn_id))  # ... and wrote nothing


def test_failure_takes_the_user_message_back_out(r, store):
    task = new_turn(store)
    ts = turns(r)
    lease = ts.begin(task.turn_id)
    assert ts.fail(task.turn_id, task.conversation_id, lease.attempt, "top_k: too large") == 1
    assert store.messages(task.conversation_id) == []
    assert store.get(task.conversation_id).busy is None
    st = store.turn(task.turn_id)
    assert (st.status, st.error) == ("failed", "top_k: too large")
    assert stream(r, task.turn_id)[-1] == {"ev": "error", "a": "1", "error": "top_k: too large"}
    assert ts.fail(task.turn_id, task.conversation_id, lease.attempt, "again") == 0  # once


def test_fail_creates_nothing_for_an_unknown_turn(r):
    before = set(r.keys("*"))
    assert turns(r).fail("no-such-turn", "no-such-conversation", 0, "invalid payload") == -2
    assert set(r.keys("*")) == before


def test_poison_turn_is_given_up_after_max_attempts(r, store):
    """Each delivery is one BEGIN: a turn whose worker dies every time (it never commits or fails) is
    failed with the reason on the delivery after max_attempts, and its user message is taken out."""
    task = new_turn(store)
    ts = turns(r, max_attempts=3)
    assert [ts.begin(task.turn_id).attempt for _ in range(3)] == [1, 2, 3]
    lease = ts.begin(task.turn_id)
    assert (lease.status, lease.attempt) == ("poison", 4)
    st = store.turn(task.turn_id)
    assert st.status == "failed" and "gave up after 3 attempts" in st.error
    assert store.messages(task.conversation_id) == [] and store.get(task.conversation_id).busy is None
    assert stream(r, task.turn_id)[-1]["ev"] == "error"
    assert ts.begin(task.turn_id).status == "finished"  # and it stays given up


def test_dead_letter_keeps_payload_and_reason(r):
    ts = turns(r)
    ts.dead_letter({"turn_id": "x"}, "invalid payload: messages: Field required")
    (entry,) = [json.loads(x) for x in r.lrange(KEYS.dead, 0, -1)]
    assert entry["payload"] == {"turn_id": "x"} and entry["reason"].startswith("invalid payload")
    assert entry["worker"] == "w" and entry["at"] <= time.time()
