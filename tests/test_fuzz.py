"""Property-based fuzzing (Hypothesis) of what reaches a real worker and the store, on a private
redis-server with one `python -m worker` (tiny-neox).

Queue items: anything at all (bytes, text, JSON), and copies of a real turn's task message with fields
removed, replaced or mistyped, bodies swapped and payload fields garbled. Conversations: generated
histories (lengths, sizes, any unicode) and user texts, through the producer's start_turn.

After every example: the worker process is alive and still serving, the item was either served or
dead-lettered (and then the turn it names is answered), no conversation is left busy with a turn that
will never end, and every key a turn made has a TTL or an index that owns it. FUZZ_EXAMPLES sets the
number of examples per property (the bounded profile in `make test` keeps both under a minute);
`pytest -m long tests/test_fuzz.py` runs a long profile; HYPOTHESIS_PROFILE=explore draws new inputs
(tests/conftest.py).
"""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from producer.client import ChatClient
from producer.store import new_id
from shared.errors import ChatError
from shared.keys import Keys
from shared.messages import ChatMessage, Role
from shared.sampling import SamplingParams
from shared.task_message import generate_message
from shared.wire import GenerateTask, TurnStatus
from tests.conftest import tiny_settings
from tests.procs import RedisServer, WorkerProcess

pytestmark = pytest.mark.slow
KEYS = Keys("chat")
QUEUE, PARKED = "chat.tiny-neox", "chat.parked"
QUICK = SamplingParams(temperature=0.0, max_tokens=2)
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
                    max_leaves=8)
ANY_TEXT = st.text(st.characters(codec=None, categories=None), max_size=200)  # controls and surrogates included


class Stack:
    def __init__(self, tmp: Path):
        self.server = RedisServer()
        self.worker = WorkerProcess(self.server.url, "fuzz", tmp, CHAT_LEASE_S="3", CHAT_LOST_AFTER_S="3")
        self.worker.wait_ready(90)
        self.client = ChatClient(tiny_settings(self.server.url))
        self.r = self.client.r
        self.probe = self.client.create_conversation("tiny-neox")
        self.examples = 0

    def park(self) -> tuple[str, dict[str, Any]]:
        """A turn stored as a producer stores it, its message parked where no worker reads it."""
        cid = self.client.create_conversation("tiny-neox")
        tid = new_id()
        user = ChatMessage(role=Role.prompter, text="hello")
        payload = GenerateTask(turn_id=tid, conversation_id=cid, model="tiny-neox", messages=[user],
                               sampling=QUICK).model_dump(mode="json")
        self.client.store.start(turn_id=tid, conversation_id=cid, model="tiny-neox", queue=PARKED, user=user,
                                task_message=generate_message(tid, PARKED, payload), enqueued_at=time.time(),
                                expect_turn=None, history_cap=0, require_live=False, max_queue_depth=-1)
        return tid, payload

    def still_serving(self) -> None:
        """The worker is alive and has got past everything pushed before (it serves in order)."""
        assert self.worker.proc.poll() is None, self.worker.log()[-3000:]
        res = self.client.ask(self.probe, "still there?", QUICK, timeout=30)
        assert res.finish_reason.value in ("length", "end_key")

    def idle(self, timeout: float = 30) -> None:
        """Wait until no turn runs and nothing waits on the worker's queue."""
        end = time.monotonic() + timeout
        while self.r.zcard(KEYS.running) or self.r.llen(QUEUE):
            assert time.monotonic() < end, (self.r.zrange(KEYS.running, 0, -1), self.r.llen(QUEUE))
            time.sleep(0.02)

    def check_keys(self) -> None:
        """Every turn key has a lifetime or an index that owns it; no conversation waits on a turn that ended."""
        running, queued = set(self.r.zrange(KEYS.running, 0, -1)), set(self.r.zrange(KEYS.queued, 0, -1))
        for key in self.r.scan_iter("chat:turn:*"):
            if key.endswith(b":stream"):
                assert self.r.ttl(key) > 0, key
                continue
            tid = key.rsplit(b":", 1)[1]
            status = self.r.hget(key, "status")
            if status in (b"done", b"failed"):
                assert self.r.ttl(key) > 0, key
            else:
                assert tid in running or tid in queued, (key, status)
        for key in self.r.scan_iter("chat:conv:*"):
            if key.endswith(b":messages"):
                continue
            busy = self.r.hget(key, "busy")
            if busy:
                assert self.r.hget(KEYS.turn(busy.decode()), "status") in (b"queued", b"running"), key

    def close(self) -> None:
        self.client.close()
        self.worker.stop()
        self.server.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(Path(tmp_path_factory.mktemp("fuzz")))
    yield s
    print(f"\nfuzz: {s.examples} examples, worker alive: {s.worker.proc.poll() is None}, "
          f"dead letters: {s.r.llen(KEYS.dead)}")
    s.close()


FIELDS = [(None, "body"), (None, "content-type"), (None, "content-encoding"), (None, "headers"), (None, "properties"),
          ("headers", "task"), ("headers", "id"), ("headers", "eta"), ("headers", "expires"), ("headers", "lang"),
          ("properties", "body_encoding"), ("properties", "delivery_info"), ("properties", "correlation_id"),
          ("properties", "delivery_tag"), ("properties", "priority")]
PAYLOAD_FIELDS = ["turn_id", "conversation_id", "model", "messages", "sampling", "deadline", "enqueued_at",
                  "dropped_messages", "truncate", "extra"]
SAMPLING_FIELDS = ["temperature", "top_k", "top_p", "repetition_penalty", "max_tokens", "seed", "stop"]

envelope_edits = st.lists(st.tuples(st.sampled_from(FIELDS), st.one_of(st.just("<delete>"), JSON)), max_size=3)
payload_edits = st.lists(st.tuples(st.sampled_from(PAYLOAD_FIELDS), st.one_of(st.just("<delete>"), JSON)),
                         max_size=2)
sampling_edits = st.lists(st.tuples(st.sampled_from(SAMPLING_FIELDS), JSON), max_size=2)
raw_items = st.one_of(st.binary(max_size=200), st.text(max_size=200), JSON.map(json.dumps))


def edit(target: Any, key: str, value: Any) -> None:
    if isinstance(target, dict):
        if value == "<delete>":
            target.pop(key, None)
        else:
            target[key] = value


QUEUE_ITEMS = {"raw": st.one_of(st.none(), raw_items), "env_edits": envelope_edits, "pay_edits": payload_edits,
               "samp_edits": sampling_edits, "body": st.one_of(st.none(), st.binary(max_size=60), JSON)}


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(**QUEUE_ITEMS)
@example(raw=None, env_edits=[], pay_edits=[], samp_edits=[("top_k", 264)], body=None)  # CI, stop 20
@example(raw=None, env_edits=[], pay_edits=[], samp_edits=[("max_tokens", 10**6)], body=None)
def test_whatever_sits_on_the_queue_the_worker_lives_and_every_turn_is_answered(
        stack: Stack, raw: Any, env_edits: list, pay_edits: list, samp_edits: list, body: Any) -> None:
    queue_item(stack, raw, env_edits, pay_edits, samp_edits, body)


@pytest.mark.long
@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(**QUEUE_ITEMS)
def test_long_queue_fuzz(stack: Stack, raw: Any, env_edits: list, pay_edits: list, samp_edits: list,
                         body: Any) -> None:
    queue_item(stack, raw, env_edits, pay_edits, samp_edits, body)


def queue_item(stack: Stack, raw: Any, env_edits: list, pay_edits: list, samp_edits: list, body: Any) -> None:
    """Push one item (raw, or a real turn's message edited), then check the invariants."""
    stack.examples += 1
    dead0 = stack.r.llen(KEYS.dead)
    tid = None
    if raw is not None:
        item: bytes | str = raw
    else:
        tid, payload = stack.park()
        for key, value in samp_edits:
            edit(payload.get("sampling"), key, value)
        for key, value in pay_edits:
            edit(payload, key, value)
        env = json.loads(generate_message(tid, QUEUE, payload))
        for (where, key), value in env_edits:
            edit(env if where is None else env.get(where), key, value)
        if body is not None:
            env["body"] = base64.b64encode(body if isinstance(body, bytes) else json.dumps(body).encode()).decode()
        item = json.dumps(env)
    stack.r.lpush(QUEUE, item)
    stack.still_serving()  # the worker popped the item before the probe ...
    stack.idle()  # ... and whatever it started for it has ended (a refusal after BEGIN happens in a pool thread)
    refused = [json.loads(x)["payload"] for x in stack.r.lrange(KEYS.dead, 0, stack.r.llen(KEYS.dead) - dead0 - 1)]
    named = {t for entry in refused for t in (entry.get("turn_ids") or [entry.get("turn_id")]) if t}
    if tid is None:
        assert refused  # nothing to serve: dead-lettered with the reason
        return stack.check_keys()
    status = stack.client.store.turn(tid).status
    if tid in named:
        assert status is TurnStatus.failed  # the turn it names is answered
    elif status is TurnStatus.queued:
        assert refused  # refused, naming another turn or none
        stack.client.cancel(tid)  # this one's real message is parked where no worker reads it: end it here
    elif status is TurnStatus.failed:  # well formed, but past what only the worker knows: the model's
        error = stack.client.store.turn(tid).error or ""  # vocabulary (top_k) or sequence length
        assert error.split(":")[0] in WORKER_LIMITS, error  # answered, naming the field at fault
    else:
        assert status is TurnStatus.done  # accepted: served
    stack.check_keys()


# The fields a worker-side refusal names (shared/sampling.check_vocab, shared/context.fit).
WORKER_LIMITS = {"top_k", "max_tokens", "prompt", "messages", "system"}


user_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cc", "Cs"]), min_size=1, max_size=300)
reply_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=300)


@settings(max_examples=max(10, EXAMPLES // 2), deadline=None, suppress_health_check=list(HealthCheck),
          database=None)
@given(history=st.lists(st.tuples(user_text, reply_text), max_size=60), long_turns=st.integers(0, 3),
       system=st.one_of(st.none(), user_text), text=ANY_TEXT)
def test_any_conversation_shape_either_runs_a_turn_or_is_refused_with_nothing_stored(
        stack: Stack, history, long_turns, system, text) -> None:
    stack.examples += 1
    cid = stack.client.create_conversation("tiny-neox", system=system if system and system.strip() else None)
    msgs = [m for u, a in history for m in (ChatMessage(role=Role.prompter, text=u),
                                            ChatMessage(role=Role.assistant, text=a, turn_id=uuid.uuid4().hex))]
    msgs += [ChatMessage(role=Role.prompter, text="y" * 30_000)] * long_turns  # some long ones
    if msgs:
        stack.r.rpush(KEYS.messages(cid), *[m.model_dump_json() for m in msgs])
    before = stack.r.llen(KEYS.messages(cid))
    try:
        turn = stack.client.send(cid, text, QUICK)
    except ChatError as e:
        assert e.message and stack.r.llen(KEYS.messages(cid)) == before  # refused: nothing stored
        assert stack.client.store.get(cid).busy is None
        stack.check_keys()
        return
    assert turn.prompt_tokens is not None and turn.prompt_tokens < 256
    res = stack.client.wait(turn.turn_id, timeout=30)
    assert res.prompt_tokens + res.completion_tokens <= 256
    assert stack.r.llen(KEYS.messages(cid)) == before + 2
    stack.check_keys()
