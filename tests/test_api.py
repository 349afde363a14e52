"""The HTTP API's conversation routes against a live server and a real worker (tiny-neox)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
import redis

from producer.api.auth import KeyRing, hash_key
from producer.api.errors import error_body
from tests.api_live import KEY_A, KEY_B, LiveServer, live_api, tiny_worker

IDLE_MODEL = "smollm2-135m"  # a preset no worker serves here: its turns stay queued


@pytest.fixture(scope="module")
def server(redis_url: str) -> Iterator[LiveServer]:
    with tiny_worker(redis_url), live_api(redis_url) as s:
        yield s


@pytest.fixture
def a(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=30) as c:
        yield c


@pytest.fixture
def b(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY_B}, timeout=30) as c:
        yield c


@pytest.fixture
def idle_queue(redis_url: str) -> Iterator[redis.Redis]:
    """The idle model's queue, emptied before and after."""
    r = redis.Redis.from_url(redis_url)
    r.delete(f"chat.{IDLE_MODEL}")
    yield r
    r.delete(f"chat.{IDLE_MODEL}")
    r.close()


def events(c: httpx.Client, url: str, headers: dict[str, str] | None = None, limit: int = 1000) -> list[dict]:
    """Read SSE events until done/error (or `limit` events)."""
    out: list[dict] = []
    cur: dict = {}
    with c.stream("GET", url, headers=headers or {}) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if not line:
                if "data" in cur:
                    cur["data"] = json.loads(cur["data"])
                    out.append(cur)
                    if cur.get("event") in ("done", "error") or len(out) >= limit:
                        break
                cur = {}
            elif not line.startswith(":"):
                field, _, value = line.partition(": ")
                cur[field] = value
    return out


def new_turn(c: httpx.Client, model: str = "tiny-neox", **body: object) -> tuple[str, dict]:
    conv = c.post("/api/conversations", json={"model": model, "system": "Be brief."})
    assert conv.status_code == 201, conv.text
    cid = conv.json()["id"]
    turn = c.post(f"/api/conversations/{cid}/messages", json={"content": "Hello there", **body})
    assert turn.status_code == 202, turn.text
    return cid, turn.json()


def test_conversation_turn_streams_and_is_stored(a: httpx.Client) -> None:
    cid, turn = new_turn(a, max_tokens=12, seed=1, temperature=0.8, top_k=20, top_p=0.9)
    evs = events(a, turn["events_url"])
    kinds = [e["event"] for e in evs]
    assert kinds[0] in ("queued", "start") and kinds[-1] == "done", kinds
    assert "start" in kinds and "token" in kinds
    done = evs[-1]["data"]
    streamed = "".join(e["data"]["text"] for e in evs if e["event"] == "token")
    assert done["reply"] == streamed and done["usage"]["completion_tokens"] == 12
    assert done["finish_reason"] == "length" and done["timings"]["total_s"] > 0

    got = a.get(turn["turn_url"]).json()
    assert got["status"] == "done" and got["reply"] == streamed and got["finish_reason"] == "length"
    assert got["usage"]["total_tokens"] == got["usage"]["prompt_tokens"] + 12
    assert got["worker"] and got["started_at"] >= got["enqueued_at"] and set(got["timings"]) >= {"prefill_s"}

    # Resuming after the start marker replays exactly what followed it (no second start).
    start_id = next(e["id"] for e in evs if e["event"] == "start")
    again = events(a, turn["events_url"], headers={"Last-Event-ID": start_id})
    assert [e["event"] for e in again if e["event"] != "queued"] == [k for k in kinds if k not in ("queued", "start")]
    assert events(a, turn["events_url"] + f"?after={start_id}")[-1]["data"]["reply"] == streamed

    msgs = a.get(f"/api/conversations/{cid}/messages").json()["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    assert msgs[1]["content"] == "Hello there" and msgs[2]["content"] == streamed
    assert msgs[2]["turn_id"] == turn["turn_id"]

    assert a.delete(f"/api/conversations/{cid}").status_code == 204
    gone = a.get(f"/api/conversations/{cid}")
    assert gone.status_code == 404 and gone.json()["error"]["type"] == "not_found_error"


def test_queue_position_while_waiting_and_cancel(a: httpx.Client, idle_queue: redis.Redis) -> None:
    _, first = new_turn(a, IDLE_MODEL)
    cid, second = new_turn(a, IDLE_MODEL)
    assert (first["queue_position"], second["queue_position"]) == (1, 2)
    assert idle_queue.llen(f"chat.{IDLE_MODEL}") == 2
    got = a.get(second["turn_url"]).json()
    assert got["status"] == "queued" and got["queue_position"] == 2
    ev = events(a, second["events_url"], limit=1)
    assert ev == [{"event": "queued", "data": {"position": 2}}]
    busy = a.post(f"/api/conversations/{cid}/messages", json={"content": "again"})
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "turn_in_flight"
    cancelled = a.post(second["turn_url"] + "/cancel")
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "queued"
    models = {m["id"]: m for m in a.get("/api/models").json()["models"]}
    assert models[IDLE_MODEL]["queue_depth"] == 2 and models["tiny-neox"]["served"]


def test_other_key_gets_404_on_every_conversation_route(a: httpx.Client, b: httpx.Client) -> None:
    cid, turn = new_turn(a, max_tokens=4)
    events(a, turn["events_url"])
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
    # Key B's 404 is the same as for a conversation that does not exist.
    missing = b.get("/api/conversations/" + "0" * 32).json()["error"]
    assert missing["type"] == "not_found_error" and "not found" in missing["message"]
    assert a.get(conv).status_code == 200 and len(a.get(f"{conv}/messages").json()["messages"]) == 3
    # A turn id from another conversation of the same key is not reachable through this one.
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
        ({"content": "hi", "stop": [""]}, "stop"),
        ({"content": ""}, "content"),
        ({"content": "   "}, "content"),
        ({"content": "bell \x07"}, "content"),
        ({}, "content"),
        ({"content": "hi", "colour": "red"}, "colour"),
    ],
)
def test_invalid_turn_fields_are_422(a: httpx.Client, body: dict, param: str) -> None:
    cid = a.post("/api/conversations", json={"model": "tiny-neox"}).json()["id"]
    resp = a.post(f"/api/conversations/{cid}/messages", json=body)
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]
    assert a.get(f"/api/conversations/{cid}").json()["busy_turn"] is None  # nothing was enqueued


def test_nan_bad_json_unknown_model_and_bad_ids(a: httpx.Client) -> None:
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
    ev = a.get(f"/api/conversations/{cid}/turns/{'1' * 32}/events", headers={"Last-Event-ID": "x"})
    assert ev.status_code == 422 and ev.json()["error"]["param"] == "Last-Event-ID"


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
    with live_api(redis_url, max_queue_depth=1, retry_after_s=7) as s, httpx.Client(
        base_url=s.url, headers={"Authorization": f"Bearer {KEY_A}"}
    ) as c:
        new_turn(c, IDLE_MODEL)
        new_turn(c, IDLE_MODEL)  # depth 1 is not deeper than 1: admitted
        cid = c.post("/api/conversations", json={"model": IDLE_MODEL}).json()["id"]
        resp = c.post(f"/api/conversations/{cid}/messages", json={"content": "hi"})
        assert resp.status_code == 503 and resp.headers["retry-after"] == "7"
        assert resp.json()["error"]["code"] == "queue_full"
        assert c.get(f"/api/conversations/{cid}/messages").json()["messages"] == []  # nothing stored
        new_turn(c)  # other models are not affected


def test_metrics_reflect_turns_that_ran(a: httpx.Client, server: LiveServer, idle_queue: redis.Redis) -> None:
    def value(text: str, prefix: str) -> float:
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(prefix))

    before = httpx.get(server.url + "/metrics").text
    _, turn = new_turn(a, max_tokens=5)
    events(a, turn["events_url"])
    new_turn(a, IDLE_MODEL)
    text = httpx.get(server.url + "/metrics").text
    fin = 'chat_turns_finished_total{finish_reason="length",model="tiny-neox"}'
    assert value(text, fin) == value(before, fin) + 1
    assert value(text, 'chat_turns_started_total{model="tiny-neox"}') >= 1
    assert value(text, 'chat_tokens_generated_total{model="tiny-neox"}') >= value(before, "chat_tokens_generated") + 5
    assert value(text, 'chat_time_to_first_token_seconds_count{model="tiny-neox"}') >= 1
    assert value(text, 'chat_turn_latency_seconds_count{model="tiny-neox"}') >= 1
    assert f'chat_queue_depth{{model="{IDLE_MODEL}"}} 1.0' in text
    assert 'chat_queue_depth{model="tiny-neox"} 0.0' in text
    assert "chat_worker_busy_slots" in text


def test_busy_slots_from_worker_reports(a: httpx.Client, server: LiveServer, redis_url: str) -> None:
    import time

    r = redis.Redis.from_url(redis_url)
    r.hset("chat:workers", "gpu@host1", json.dumps({"model": "m", "busy": 3, "slots": 64, "at": time.time()}))
    r.hset("chat:workers", "old@host2", json.dumps({"model": "m", "busy": 1, "slots": 8, "at": time.time() - 600}))
    text = httpx.get(server.url + "/metrics").text
    r.delete("chat:workers")
    assert 'chat_worker_busy_slots{worker="gpu@host1"} 3.0' in text
    assert 'chat_worker_slots{worker="gpu@host1"} 64.0' in text and "old@host2" not in text


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
        # A keyed caller does not see anonymous conversations.
        assert httpx.get(server.url + f"/api/conversations/{conv.json()['id']}",
                         headers={"Authorization": f"Bearer {KEY_A}"}).status_code == 404
