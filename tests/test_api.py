"""The HTTP API's conversation routes against a live server and a real worker (tiny-neox, sequence
length 256): streaming, ownership, client errors as 4xx before anything is stored, admission, metrics,
CORS, SSE keep-alives and resumption."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest
import redis

from producer.api.auth import KeyRing, hash_key
from producer.api.errors import error_body
from shared.cards import WorkerReport
from shared.keys import Keys
from tests.api_live import KEY_A, KEY_B, LiveServer, live_api, tiny_worker
from worker.turn_store import TurnStore

IDLE_MODEL = "smollm2-135m"  # a preset no worker serves here
KEYS = Keys("chat")


@pytest.fixture(scope="module")
def server(redis_url: str) -> Iterator[LiveServer]:
    with tiny_worker(redis_url), live_api(redis_url) as s:
        yield s


@pytest.fixture(scope="module")
def queueing(server: LiveServer, redis_url: str) -> Iterator[LiveServer]:
    """A second API process configured to queue turns for models no worker serves yet."""
    with live_api(redis_url, queue_without_workers=True, sse_ping_s=0.2) as s:
        yield s


def authed(server: LiveServer, key: str = KEY_A) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


@pytest.fixture
def a(server: LiveServer) -> Iterator[httpx.Client]:
    with authed(server) as c:
        yield c


@pytest.fixture
def b(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY_B}, timeout=30) as c:
        yield c


@pytest.fixture
def q(queueing: LiveServer, idle_queue: redis.Redis) -> Iterator[httpx.Client]:
    with authed(queueing) as c:
        yield c


@pytest.fixture
def idle_queue(redis_url: str) -> Iterator[redis.Redis]:
    """The idle model's queue, emptied before and after (its turns cancelled, so none is queued again)."""
    r = redis.Redis.from_url(redis_url)

    def empty() -> None:
        for raw in r.lrange(f"chat.{IDLE_MODEL}", 0, -1):
            tid = json.loads(raw)["headers"]["id"]
            r.hset(KEYS.turn(tid), "status", "failed")
            r.zrem(KEYS.queued, tid)
        r.delete(f"chat.{IDLE_MODEL}")

    empty()
    yield r
    empty()
    r.close()


def read_sse(c: httpx.Client, url: str, headers: dict[str, str] | None = None, limit: int = 1000,
             comments: list[str] | None = None) -> list[dict]:
    """SSE events until done/error (or `limit` events); comment lines go to `comments`."""
    out: list[dict] = []
    cur: dict = {}
    with c.stream("GET", url, headers=headers or {}) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if not line:
                if cur:
                    assert "data" in cur, cur  # no block without data (a bare `retry:` reads as an empty event)
                    cur["data"] = json.loads(cur["data"])
                    out.append(cur)
                    if cur.get("event") in ("done", "error") or len(out) >= limit:
                        break
                cur = {}
            elif line.startswith(":"):
                if comments is not None:
                    comments.append(line)
                    if len(comments) >= 3:
                        break
            else:
                field, _, value = line.partition(": ")
                cur[field] = value
    return out


def new_turn(c: httpx.Client, model: str = "tiny-neox", system: str | None = "Be brief.", **body: object
             ) -> tuple[str, dict]:
    conv = c.post("/api/conversations", json={"model": model, **({"system": system} if system else {})})
    assert conv.status_code == 201, conv.text
    cid = conv.json()["id"]
    turn = c.post(f"/api/conversations/{cid}/messages", json={"content": "Hello there", **body})
    assert turn.status_code == 202, turn.text
    return cid, turn.json()


def turn_keys(r: redis.Redis) -> set[bytes]:
    return {k for k in r.keys("chat:turn:*") if not k.endswith(b":stream")}


def test_a_message_longer_than_the_context_keeps_its_end_and_says_how_much_was_cut(a: httpx.Client) -> None:
    cid, turn = new_turn(a, system=None, max_tokens=4)
    read_sse(a, turn["events_url"])
    assert turn["truncated_tokens"] == 0
    turn = a.post(f"/api/conversations/{cid}/messages", json={"content": "word " * 600, "max_tokens": 4}).json()
    assert turn["truncated_tokens"] > 0 and turn["dropped_messages"] == 2  # the first turn made room, then the cut
    done = read_sse(a, turn["events_url"])[-1]["data"]
    assert done["truncated_tokens"] == turn["truncated_tokens"] and done["dropped_messages"] == 2
    assert a.get(turn["turn_url"]).json()["truncated_tokens"] == turn["truncated_tokens"]


def test_conversation_turn_streams_and_is_stored(a: httpx.Client) -> None:
    cid, turn = new_turn(a, max_tokens=12, seed=1, temperature=0.8, top_k=20, top_p=0.9)
    evs = read_sse(a, turn["events_url"])
    kinds = [e["event"] for e in evs]
    assert kinds[0] in ("queued", "start") and kinds[-1] == "done", kinds
    assert kinds.count("start") == 1 and "token" in kinds
    done = evs[-1]["data"]
    streamed = "".join(e["data"]["text"] for e in evs if e["event"] == "token")
    assert done["reply"] == streamed and done["usage"]["completion_tokens"] == 12
    assert done["finish_reason"] == "length" and done["timings"]["total_s"] > 0 and done["dropped_messages"] == 0

    got = a.get(turn["turn_url"]).json()
    assert got["status"] == "done" and got["reply"] == streamed and got["finish_reason"] == "length"
    assert got["usage"]["total_tokens"] == got["usage"]["prompt_tokens"] + 12
    assert got["worker"] and got["started_at"] >= got["enqueued_at"] and set(got["timings"]) >= {"prefill_s"}

    # Resuming after any event replays exactly what followed it.
    start_id = next(e["id"] for e in evs if e["event"] == "start")
    again = read_sse(a, turn["events_url"], headers={"Last-Event-ID": start_id})
    assert [e["event"] for e in again] == [k for k in kinds if k not in ("queued", "start")]
    mid = [e for e in evs if e["event"] == "token"][len(again) // 3]
    rest = read_sse(a, turn["events_url"] + f"?after={mid['id']}")
    assert "".join(e["data"]["text"] for e in rest if e["event"] == "token") == streamed.split(
        "".join(e["data"]["text"] for e in evs[: evs.index(mid) + 1] if e["event"] == "token"), 1)[1]
    assert rest[-1]["data"]["reply"] == streamed
    for end in (evs[-1]["id"], "99999999999999-0"):  # at or past the end: the final event still comes
        last = read_sse(a, turn["events_url"], headers={"Last-Event-ID": end})
        assert [e["event"] for e in last] == ["done"] and last[0]["data"]["reply"] == streamed

    msgs = a.get(f"/api/conversations/{cid}/messages").json()["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    assert msgs[1]["content"] == "Hello there" and msgs[2]["content"] == streamed
    assert msgs[2]["turn_id"] == turn["turn_id"]

    assert a.delete(f"/api/conversations/{cid}").status_code == 204
    gone = a.get(f"/api/conversations/{cid}")
    assert gone.status_code == 404 and gone.json()["error"]["type"] == "not_found_error"


def test_a_model_no_live_worker_serves_is_503_at_once_and_nothing_is_stored(a: httpx.Client, redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    before = turn_keys(r)
    cid = a.post("/api/conversations", json={"model": IDLE_MODEL}).json()["id"]
    t0 = time.monotonic()
    resp = a.post(f"/api/conversations/{cid}/messages", json={"content": "hi"})
    assert time.monotonic() - t0 < 2
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "model_not_served"
    assert "no live worker serves it" in resp.json()["error"]["message"] and resp.headers["retry-after"]
    assert a.get(f"/api/conversations/{cid}/messages").json()["messages"] == [] and turn_keys(r) == before
    models = {m["id"]: m for m in a.get("/api/models").json()["models"]}
    assert models["tiny-neox"]["served"] and models["tiny-neox"]["context_length"] == 256
    assert not models[IDLE_MODEL]["served"] and models[IDLE_MODEL]["workers"] == 0


def test_queue_position_while_waiting_and_cancel_frees_the_conversation(q: httpx.Client, idle_queue) -> None:
    _, first = new_turn(q, IDLE_MODEL)
    cid, second = new_turn(q, IDLE_MODEL)
    assert (first["queue_position"], second["queue_position"]) == (1, 2)
    assert idle_queue.llen(f"chat.{IDLE_MODEL}") == 2
    got = q.get(second["turn_url"]).json()
    assert got["status"] == "queued" and got["queue_position"] == 2
    ev = read_sse(q, second["events_url"], limit=1)
    assert [(e["event"], e["data"]) for e in ev] == [("queued", {"position": 2})]
    assert "retry" in ev[0]  # the reconnect delay rides on the first real event
    busy = q.post(f"/api/conversations/{cid}/messages", json={"content": "again"})
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "turn_in_flight"
    cancelled = q.post(second["turn_url"] + "/cancel")
    assert cancelled.status_code == 202, cancelled.text
    assert cancelled.json()["status"] == "done" and cancelled.json()["finish_reason"] == "cancelled"
    assert idle_queue.llen(f"chat.{IDLE_MODEL}") == 1  # its message left the queue
    assert q.get(first["turn_url"]).json()["queue_position"] == 1
    assert q.get(f"/api/conversations/{cid}").json()["busy_turn"] is None  # free: the next turn goes in
    assert q.post(f"/api/conversations/{cid}/messages", json={"content": "again"}).status_code == 202


def test_a_turn_handed_back_shows_queued_with_its_position(q: httpx.Client, redis_url: str, idle_queue) -> None:
    _, turn = new_turn(q, IDLE_MODEL)
    r = redis.Redis.from_url(redis_url)
    ts = TurnStore(r, KEYS, worker="leaving@host")
    r.rpop(f"chat.{IDLE_MODEL}")  # a worker took it ...
    ts.begin(turn["turn_id"], "d1")
    running = q.get(turn["turn_url"]).json()
    assert running["status"] == "running" and running["worker"] == "leaving@host"
    assert ts.hand_back(turn["turn_id"], 1) == 1  # ... and handed it back at a cold shutdown
    got = q.get(turn["turn_url"]).json()
    assert (got["status"], got["queue_position"], got["worker"]) == ("queued", 1, None)


def test_other_key_gets_404_on_every_conversation_route(a: httpx.Client, b: httpx.Client) -> None:
    cid, turn = new_turn(a, max_tokens=4)
    read_sse(a, turn["events_url"])
    conv = f"/api/conversations/{cid}"
    routes = [
        ("GET", conv, None),
        ("DELETE", conv, None),
        ("GET", f"{conv}/messages", None),
        ("POST", f"{conv}/messages", {"content": "mine now"}),
        ("GET", turn["turn_url"], None),
        ("GET", turn["events_url"], None),
        ("POST", turn["turn_url"] + "/cancel", None),
    ]
    for method, url, body in routes:
        resp = b.request(method, url, json=body)
        assert resp.status_code == 404, (method, url, resp.text)
        assert resp.json()["error"]["message"] == f"conversation {cid!r} not found"
    missing = b.get("/api/conversations/" + "0" * 32).json()["error"]
    assert missing["type"] == "not_found_error" and "not found" in missing["message"]
    assert a.get(conv).status_code == 200 and len(a.get(f"{conv}/messages").json()["messages"]) == 3
    other, _ = new_turn(a, max_tokens=2)
    assert a.get(f"/api/conversations/{other}/turns/{turn['turn_id']}").status_code == 404


def test_missing_and_wrong_keys_are_401(server: LiveServer) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic " + KEY_A}):
        resp = httpx.get(server.url + "/api/models", headers=headers)
        assert resp.status_code == 401, headers
        assert resp.json()["error"]["type"] == "authentication_error"
        assert resp.headers["www-authenticate"] == "Bearer"
    assert httpx.get(server.url + "/api/info").json() == {"auth": True, "version": "0.1.0"}


@pytest.mark.parametrize(
    "body,param",
    [
        ({"content": "hi", "temperature": -0.5}, "temperature"),
        ({"content": "hi", "top_p": 0}, "top_p"),
        ({"content": "hi", "top_p": 1.01}, "top_p"),
        ({"content": "hi", "max_tokens": 0}, "max_tokens"),
        ({"content": "hi", "top_k": -1}, "top_k"),
        ({"content": "hi", "stop": [""]}, "stop[0]"),  # the element at fault
        ({"content": ""}, "content"),
        ({"content": "   "}, "content"),
        ({"content": "bell \x07"}, "content"),
        ({}, "content"),
        ({"content": "hi", "colour": "red"}, "colour"),
        # strict types: a bool is not a number, a string is not a number
        ({"content": "hi", "top_k": True}, "top_k"),
        ({"content": "hi", "top_k": "5"}, "top_k"),
        ({"content": "hi", "max_tokens": True}, "max_tokens"),
        ({"content": "hi", "temperature": "0.5"}, "temperature"),
        ({"content": 5}, "content"),
        ({"content": "\u200b\u200b"}, "content"),  # only zero-width characters: empty
        ({"content": "hi", "stop": [1]}, "stop[0]"),
        # what the worker would refuse for this model, refused here first
        ({"content": "hi", "max_tokens": 256}, "max_tokens"),
        ({"content": "hi", "max_tokens": 10_000}, "max_tokens"),
        ({"content": "hi", "top_k": 100_000}, "top_k"),
    ],
)
def test_invalid_turn_fields_are_422_and_nothing_is_stored(a: httpx.Client, redis_url: str, body: dict,
                                                           param: str) -> None:
    r = redis.Redis.from_url(redis_url)
    before = turn_keys(r)
    cid = a.post("/api/conversations", json={"model": "tiny-neox"}).json()["id"]
    resp = a.post(f"/api/conversations/{cid}/messages", json=body)
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]
    assert a.get(f"/api/conversations/{cid}").json()["busy_turn"] is None  # nothing was enqueued
    assert a.get(f"/api/conversations/{cid}/messages").json()["messages"] == [] and turn_keys(r) == before


def test_a_system_prompt_that_leaves_no_room_is_refused_when_the_conversation_is_made(a: httpx.Client) -> None:
    resp = a.post("/api/conversations", json={"model": "tiny-neox", "system": "rules " * 60})
    assert resp.status_code == 422 and resp.json()["error"]["param"] == "system"
    assert resp.json()["error"]["message"].startswith("system: the system prompt and template take")  # as param
    for blank in ("\u200b", "\u202e\u200b", " \t\n"):  # nothing a reader could see is empty
        assert a.post("/api/conversations", json={"model": "tiny-neox", "system": blank}).status_code == 422


@pytest.mark.parametrize("body", [b"\xff\xfe{", b"[" * 5000, b'{"content": ' + b"9" * 5000 + b"}"])
def test_a_body_no_parser_can_read_is_422_json_invalid(a: httpx.Client, body: bytes) -> None:
    cid = a.post("/api/conversations", json={"model": "tiny-neox"}).json()["id"]
    resp = a.post(f"/api/conversations/{cid}/messages", content=body, headers={"Content-Type": "application/json"})
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "json_invalid", resp.text
    assert a.get(f"/api/conversations/{cid}/messages").json()["messages"] == []


def test_nan_bad_json_unknown_model_bad_ids_and_stream_ids(a: httpx.Client) -> None:
    cid = a.post("/api/conversations", json={"model": "tiny-neox"}).json()["id"]
    nan = a.post(f"/api/conversations/{cid}/messages", content=b'{"content": "hi", "temperature": NaN}',
                 headers={"Content-Type": "application/json"})
    assert nan.status_code == 422 and nan.json()["error"]["param"] == "temperature"
    bad = a.post(f"/api/conversations/{cid}/messages", content=b'{"content": "hi",',
                 headers={"Content-Type": "application/json"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "json_invalid"
    unknown = a.post("/api/conversations", json={"model": "gpt-9"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert a.post("/api/conversations", json={"model": "tiny-neox", "system": ""}).status_code == 422
    assert a.get("/api/conversations/bad:id").status_code == 422
    assert a.get(f"/api/conversations/{cid}%0A").status_code == 422  # a trailing newline is not part of an id
    events = f"/api/conversations/{cid}/turns/{'1' * 32}/events"
    ev = a.get(events, headers={"Last-Event-ID": "x"})
    assert ev.status_code == 422 and ev.json()["error"]["param"] == "Last-Event-ID"
    for after in ("99999999999999999999-0", "1-99999999999999999999", "18446744073709551616-0"):
        resp = a.get(events, params={"after": after})  # passes a digits check; Redis would refuse it
        assert resp.status_code == 422 and resp.json()["error"]["param"] == "after", (after, resp.text)


def test_delete_mid_turn_stops_it_and_writes_nothing_for_the_conversation(a: httpx.Client, redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    cid, turn = new_turn(a, max_tokens=200, temperature=1.0, top_k=2, ignore_eos=True)
    evs = read_sse(a, turn["events_url"], limit=3)
    assert any(e["event"] == "token" for e in evs)
    assert a.delete(f"/api/conversations/{cid}").status_code == 204
    end = time.monotonic() + 20
    while r.hget(KEYS.turn(turn["turn_id"]), "status") not in (b"done", b"failed"):
        assert time.monotonic() < end
        time.sleep(0.05)
    time.sleep(0.2)
    assert not r.keys(f"chat:conv:{cid}*")  # nothing recreated for the deleted conversation
    assert r.ttl(KEYS.turn(turn["turn_id"])) > 0 and r.ttl(KEYS.stream(turn["turn_id"])) > 0


def test_rate_limit_is_per_key_429(redis_url: str, server: LiveServer) -> None:
    with live_api(redis_url, rate_limit_per_min=6, rate_limit_burst=3, key_prefix="chat") as s:
        ha, hb = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}
        codes = [httpx.get(s.url + "/api/models", headers=ha).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        limited = httpx.get(s.url + "/api/models", headers=ha)
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        assert limited.json()["error"]["type"] == "rate_limit_error"
        assert httpx.get(s.url + "/api/models", headers=hb).status_code == 200  # B has its own bucket
        assert 'chat_api_rejected_total{reason="rate_limit"} 2.0' in httpx.get(s.url + "/metrics").text


def test_deep_queue_is_503_with_retry_after(redis_url: str, server: LiveServer, idle_queue: redis.Redis) -> None:
    with live_api(redis_url, max_queue_depth=1, retry_after_s=7, queue_without_workers=True) as s, authed(s) as c:
        new_turn(c, IDLE_MODEL)
        new_turn(c, IDLE_MODEL)  # depth 1 is not deeper than 1: admitted
        cid = c.post("/api/conversations", json={"model": IDLE_MODEL}).json()["id"]
        resp = c.post(f"/api/conversations/{cid}/messages", json={"content": "hi"})
        assert resp.status_code == 503 and resp.headers["retry-after"] == "7"
        assert resp.json()["error"]["code"] == "queue_full"
        assert c.get(f"/api/conversations/{cid}/messages").json()["messages"] == []  # nothing stored
        new_turn(c)  # other models are not affected


def test_sse_keepalive_follows_the_setting(q: httpx.Client) -> None:
    _, turn = new_turn(q, IDLE_MODEL)  # waits in the queue: nothing but keep-alives to send
    comments: list[str] = []
    t0 = time.monotonic()
    evs = read_sse(q, turn["events_url"], comments=comments)
    assert comments == [": ping"] * 3 and time.monotonic() - t0 < 5  # every 0.2 s here (CHAT_SSE_PING_S)
    assert [e["event"] for e in evs] == ["queued"]


def test_cors_preflight_and_headers_for_allowed_origins_only(redis_url: str, server: LiveServer) -> None:
    with live_api(redis_url, cors_origins="https://app.example") as s:
        pre = httpx.options(s.url + "/v1/chat/completions", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in pre.headers["access-control-allow-methods"]
        got = httpx.get(s.url + "/api/models", headers={"Origin": "https://app.example",
                                                        "Authorization": f"Bearer {KEY_A}"})
        assert got.headers["access-control-allow-origin"] == "https://app.example"
        other = httpx.options(s.url + "/v1/chat/completions", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in other.headers
    off = httpx.options(server.url + "/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in off.headers  # off by default


def test_a_body_over_the_limit_is_413_before_it_is_read(redis_url: str, server: LiveServer) -> None:
    with live_api(redis_url, max_body_bytes=2048) as s, authed(s) as c:
        cid = c.post("/api/conversations", json={"model": "tiny-neox"}).json()["id"]
        resp = c.post(f"/api/conversations/{cid}/messages", json={"content": "x" * 4000})
        assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"

        def chunks():
            yield b'{"content": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}'

        chunked = c.post(f"/api/conversations/{cid}/messages", content=chunks(),
                         headers={"Content-Type": "application/json"})
        assert chunked.status_code == 413
        assert c.get(f"/api/conversations/{cid}/messages").json()["messages"] == []


def test_metrics_reflect_turns_that_ran(a: httpx.Client, server: LiveServer) -> None:
    def value(text: str, prefix: str) -> float:
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(prefix))

    before = httpx.get(server.url + "/metrics").text
    cid, turn = new_turn(a, max_tokens=5)
    read_sse(a, turn["events_url"])
    # The conversation's next turn: its history's KV is still on the worker, reused rather than prefilled.
    nxt = a.post(f"/api/conversations/{cid}/messages", json={"content": "And then?", "max_tokens": 5}).json()
    read_sse(a, nxt["events_url"])
    text = httpx.get(server.url + "/metrics").text
    fin = 'chat_turns_finished_total{finish_reason="length",model="tiny-neox"}'
    assert value(text, fin) == value(before, fin) + 2
    hits = 'chat_prefix_cache_hit_tokens_total{model="tiny-neox"}'
    assert value(text, hits) > value(before, hits)
    assert 0 < value(text, 'chat_prefix_cache_hit_ratio{model="tiny-neox"}') < 1
    assert value(text, 'chat_turns_started_total{model="tiny-neox"}') >= 1
    assert value(text, 'chat_tokens_generated_total{model="tiny-neox"}') >= value(before, "chat_tokens_generated") + 5
    assert value(text, 'chat_time_to_first_token_seconds_count{model="tiny-neox"}') >= 1
    assert value(text, 'chat_turn_latency_seconds_count{model="tiny-neox"}') >= 1
    assert 'chat_queue_depth{model="tiny-neox"} 0.0' in text
    assert 'chat_worker_slots{worker="embedded@localhost"} 4.0' in text


def test_busy_slots_from_worker_liveness_reports(server: LiveServer, redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    now = time.time()
    for name, ttl in (("gpu@host1", 15), ("gone@host2", 1)):
        rep = WorkerReport(name=name, model="tiny-neox", sequence_length=256, slots=64, busy=3, at=now)
        r.set(KEYS.worker(name), rep.model_dump_json(), ex=ttl)
        r.zadd(KEYS.live("tiny-neox"), {name: now + ttl})
    time.sleep(2.1)  # gone@host2's report expired by itself: it died without a word
    text = httpx.get(server.url + "/metrics").text
    r.delete(KEYS.worker("gpu@host1"))
    r.zrem(KEYS.live("tiny-neox"), "gpu@host1", "gone@host2")
    assert 'chat_worker_busy_slots{worker="gpu@host1"} 3.0' in text
    assert 'chat_worker_slots{worker="gpu@host1"} 64.0' in text and "gone@host2" not in text


def test_keyring_config_and_error_shape(tmp_path) -> None:
    f = tmp_path / "keys"
    f.write_text(f"# team keys\n{hash_key('k1')}  # alice\n\nsha256:{hash_key('k2').upper()}\n")
    ring = KeyRing.from_config(hash_key("k3"), str(f))
    assert [ring.identify(k) for k in ("k1", "k2", "k3")] == [hash_key(k)[:16] for k in ("k1", "k2", "k3")]
    assert ring.identify("k4") is None and ring.enabled and not KeyRing.from_config("", None).enabled
    with pytest.raises(Exception, match="CHAT_API_KEYS"):
        KeyRing.from_config("plaintext-key", None)
    assert error_body(429, "slow down") == {
        "error": {"message": "slow down", "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}
    }


def test_auth_off_is_logged_and_anonymous(redis_url: str, server: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="producer.api.app"), live_api(redis_url, api_keys="") as s:
        assert any("auth OFF" in rec.getMessage() for rec in caplog.records)
        assert httpx.get(s.url + "/api/info").json()["auth"] is False
        conv = httpx.post(s.url + "/api/conversations", json={"model": "tiny-neox"})
        assert conv.status_code == 201
        assert httpx.get(s.url + f"/api/conversations/{conv.json()['id']}").status_code == 200
        assert httpx.get(server.url + f"/api/conversations/{conv.json()['id']}",
                         headers={"Authorization": f"Bearer {KEY_A}"}).status_code == 404
