"""worker/deliveries.py: the screen every popped queue item goes through. Properties over generated items:
it never raises, it accepts exactly the well-formed generate messages (re-tagged), and whatever it refuses
it refuses with a reason, naming every turn id the item carries."""

from __future__ import annotations

import base64
import json
import string
import uuid
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.task_message import MAX_ITEM_BYTES, generate_message
from shared.wire import GenerateTask
from worker.deliveries import Accepted, Refused, screen

QUEUE = "chat.tiny-neox"
IDS = st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=64)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                    max_leaves=12)


def payload(tid: str) -> dict[str, Any]:
    return GenerateTask(turn_id=tid, conversation_id="c1", model="tiny-neox",
                        messages=[{"role": "prompter", "text": "hi"}]).model_dump(mode="json")


def test_a_producers_message_is_accepted_with_a_tag_of_its_own():
    item = generate_message("t1", QUEUE, payload("t1"))
    one, two = screen(item, "tiny-neox"), screen(item, "tiny-neox")
    assert isinstance(one, Accepted) and isinstance(two, Accepted)
    tags = {json.loads(x.item)["properties"]["delivery_tag"] for x in (one, two)}
    assert len(tags) == 2 and json.loads(item)["properties"]["delivery_tag"] not in tags  # each delivery its own
    assert one.task.turn_id == "t1"
    other = screen(item, "smollm2-135m")
    assert isinstance(other, Refused) and "is not served by this worker" in other.reason and other.turn_ids == ("t1",)


@settings(max_examples=400, deadline=None)
@given(raw=st.one_of(st.binary(max_size=300), st.text(max_size=300), JSON.map(json.dumps)))
def test_anything_at_all_is_screened_without_raising(raw):
    out = screen(raw, "tiny-neox")
    assert isinstance(out, Refused) and out.reason and len(out.item) <= 10_100


MUTABLE = [("headers", "task"), ("headers", "id"), ("headers", "eta"), ("headers", "expires"), ("properties",
           "body_encoding"), ("properties", "delivery_info"), ("properties", "correlation_id"), (None, "body"),
           (None, "content-type"), (None, "content-encoding"), (None, "headers"), (None, "properties")]


@settings(max_examples=400, deadline=None)
@given(tid=IDS, edits=st.lists(st.tuples(st.sampled_from(MUTABLE), st.one_of(st.just("<delete>"), JSON)),
                               max_size=3),
       body=st.one_of(st.none(), JSON, st.binary(max_size=50)))
def test_a_mutated_envelope_is_accepted_only_if_still_a_valid_turn(tid, edits, body):
    env = json.loads(generate_message(tid, QUEUE, payload(tid)))
    for (where, key), value in edits:
        target = env if where is None else env.get(where)
        if not isinstance(target, dict):
            continue
        if value == "<delete>":
            target.pop(key, None)
        else:
            target[key] = value
    if body is not None:
        env["body"] = base64.b64encode(body if isinstance(body, bytes) else json.dumps(body).encode()).decode()
    out = screen(json.dumps(env), "tiny-neox")
    if isinstance(out, Accepted):
        back = json.loads(out.item)
        assert back["headers"]["task"] == "generate" and back["headers"]["id"] == out.task.turn_id
        assert back["content-type"] == "application/json"
        assert not back["headers"].get("eta") and not back["headers"].get("expires")
    else:
        assert out.reason.startswith(("malformed task message", "invalid payload", "model"))
        assert out.turn_ids == tuple(dict.fromkeys(out.turn_ids))  # each once
        headers = env.get("headers")
        if isinstance(headers, dict) and headers.get("id") == tid:
            assert tid in out.turn_ids  # the turn it names can be answered


def test_an_oversized_item_is_refused_unparsed_and_still_names_its_turn():
    big = generate_message("t-big", QUEUE, {**payload("t-big"), "messages": [{"role": "prompter",
                                                                              "text": "x" * MAX_ITEM_BYTES}]})
    out = screen(big, "tiny-neox")
    assert isinstance(out, Refused) and "exceeds" in out.reason and out.turn_ids == ("t-big",)


def test_nesting_that_would_overflow_a_parser_is_refused_not_raised():
    deep = screen("[" * 1200, "tiny-neox")
    assert isinstance(deep, Refused) and "nested too deeply" in deep.reason
    env = json.loads(generate_message("t3", QUEUE, payload("t3")))
    env["body"] = base64.b64encode(b"[" * 5000).decode()
    out = screen(json.dumps(env), "tiny-neox")
    assert isinstance(out, Refused) and "the body is nested too deeply" in out.reason and out.turn_ids == ("t3",)


def test_options_celery_would_act_on_never_reach_it():
    """A non-string shadow left the task received but never run (its worker slot taken for good); embedded
    callbacks and chains made Celery publish new messages. What goes on is the canonical message."""
    env = json.loads(generate_message("t4", QUEUE, payload("t4")))
    env["headers"].update(shadow={"x": 1}, group=["g"], retries="many", timelimit="soon", stamps=[1])
    env["properties"].update(priority={"p": 1}, reply_to=["q"])
    env["properties"]["delivery_info"]["routing_key"] = "chat.other-model"
    env["body"] = base64.b64encode(json.dumps([[payload("t4")], {}, {
        "callbacks": [{"task": "celery.backend_cleanup"}], "chain": [{"task": "generate", "options": {
            "queue": QUEUE}}], "errbacks": "x", "chord": {"task": "y"}}]).encode()).decode()
    out = screen(json.dumps(env), "tiny-neox", QUEUE)
    assert isinstance(out, Accepted)
    back = json.loads(out.item)
    canonical = json.loads(generate_message("t4", QUEUE, payload("t4")))
    for part in ("headers", "content-type", "content-encoding"):
        assert back[part] == canonical[part]
    assert back["properties"]["delivery_info"] == {"exchange": "", "routing_key": QUEUE}  # where it was popped
    assert json.loads(base64.b64decode(back["body"]))[2] == {"callbacks": None, "errbacks": None, "chain": None,
                                                             "chord": None}


def test_refusals_name_the_problem():
    ok = json.loads(generate_message("t2", QUEUE, payload("t2")))
    cases = {
        "not JSON": "{",
        "a JSON list, not an envelope object": "[1,2,3]",
        "the body is missing": json.dumps({**ok, "body": None}),
        "unknown task 'x'": json.dumps({**ok, "headers": {**ok["headers"], "task": "x"}}),
        "eta is not supported": json.dumps({**ok, "headers": {**ok["headers"], "eta": "2030-01-01"}}),
        "content type 'application/x-python-serialize'": json.dumps({**ok, "content-type":
                                                                     "application/x-python-serialize"}),
        "differs from the task id": json.dumps({**ok, "headers": {**ok["headers"], "id": uuid.uuid4().hex}}),
    }
    for reason, item in cases.items():
        out = screen(item, "tiny-neox")
        assert isinstance(out, Refused) and reason in out.reason, (reason, out)
