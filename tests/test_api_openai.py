"""/v1 with the official openai client against a live server and a real worker (tiny-neox)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import redis

from tests.api_live import KEY_A, LiveServer, live_api, tiny_worker

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
]


@pytest.fixture(scope="module")
def server(redis_url: str) -> Iterator[LiveServer]:
    with tiny_worker(redis_url), live_api(redis_url) as s:
        yield s


def client(url: str, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


@pytest.fixture
def oai(server: LiveServer) -> Iterator[openai.OpenAI]:
    c = client(server.url)
    yield c
    c.close()


def test_completion_maps_history_and_sampling(oai: openai.OpenAI, redis_url: str) -> None:
    resp = oai.chat.completions.create(
        model="tiny-neox", messages=MESSAGES, max_tokens=6, temperature=0.7, top_p=0.9, seed=5, stop=["\n\n"],
        extra_body={"top_k": 40},
    )
    choice = resp.choices[0]
    assert resp.object == "chat.completion" and resp.model == "tiny-neox" and resp.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage is not None and 0 < resp.usage.completion_tokens <= 6
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    # The stateless request became a conversation: system prompt, earlier messages, the last one, the reply.
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    turn = r.hgetall(f"chat:turn:{resp.id.removeprefix('chatcmpl-')}")
    conv = r.hgetall(turn["conv_key"])
    assert conv["system"] == "You are terse." and conv["model"] == "tiny-neox" and conv["owner"]
    assert r.ttl(turn["conv_key"]) > 0
    msgs = r.lrange(turn["conv_key"] + ":messages", 0, -1)
    assert [m.split('"role":"')[1].split('"')[0] for m in msgs] == ["prompter", "assistant", "prompter", "assistant"]
    assert '"Name a colour."' in msgs[2]


def test_length_finish_and_same_seed_same_reply(oai: openai.OpenAI) -> None:
    kw = {"model": "tiny-neox", "messages": MESSAGES[1:2], "max_tokens": 4, "temperature": 0.9, "seed": 11}
    one, two = oai.chat.completions.create(**kw), oai.chat.completions.create(**kw)
    assert one.choices[0].finish_reason == "length" and one.usage.completion_tokens == 4
    assert one.choices[0].message.content == two.choices[0].message.content


def test_streaming_matches_non_streaming(oai: openai.OpenAI) -> None:
    kw = {"model": "tiny-neox", "messages": MESSAGES, "max_tokens": 10, "temperature": 0}
    full = oai.chat.completions.create(**kw)
    chunks = list(oai.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    # Without include_usage there is no usage chunk; the raw stream ends with [DONE].
    with httpx.stream("POST", oai.base_url.join("chat/completions").__str__(), json={**kw, "stream": True},
                      headers={"Authorization": f"Bearer {KEY_A}"}, timeout=30) as raw:
        lines = [ln for ln in raw.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and '"usage"' not in "".join(lines)


def test_models(oai: openai.OpenAI) -> None:
    ids = [m.id for m in oai.models.list().data]
    assert "tiny-neox" in ids and "smollm2-135m" in ids
    assert oai.models.retrieve("tiny-neox").id == "tiny-neox"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-9")


def test_unknown_model_and_bad_key(oai: openai.OpenAI, server: LiveServer) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="gpt-9", messages=MESSAGES[1:2])
    assert e.value.status_code == 404 and e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.AuthenticationError) as e2:
        client(server.url, "sk-wrong").chat.completions.create(model="tiny-neox", messages=MESSAGES[1:2])
    assert e2.value.status_code == 401 and e2.value.type == "authentication_error"
    no_key = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny-neox", "messages": MESSAGES[1:2]})
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "missing_api_key"


USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "kw,param",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 2}, "n"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": ""}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content"),
        ({"messages": [{"role": "robot", "content": "beep"}]}, "messages[0].role"),
        ({"messages": [{"role": "tool", "content": "42"}]}, "messages[0].role"),
        ({"messages": [*USER, {"role": "assistant", "content": "hello"}]}, "messages[1].role"),
        ({"messages": [*USER, {"role": "system", "content": "late"}, *USER]}, "messages[1].role"),
        ({"messages": [{"role": "user", "content": "bell \x07"}, {"role": "assistant", "content": "?"}, *USER]},
         "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x" * 16_001}]}, "messages[0].content"),
        ({"stop": [""]}, "stop"),
        ({"extra_body": {"top_k": -3}}, "top_k"),
    ],
)
def test_invalid_fields_are_422(oai: openai.OpenAI, kw: dict, param: str) -> None:
    kw = {"model": "tiny-neox", "messages": USER, **kw}
    with pytest.raises(openai.UnprocessableEntityError) as e:
        oai.chat.completions.create(**kw)
    assert e.value.status_code == 422 and e.value.param == param and e.value.type == "invalid_request_error"


def test_nan_and_bad_json_are_422(server: LiveServer) -> None:
    """The openai client refuses to send NaN, so these go raw."""

    def post(body: bytes) -> httpx.Response:
        return httpx.post(server.url + "/v1/chat/completions", content=body,
                          headers={"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"})

    for value in (b"NaN", b"Infinity"):
        resp = post(b'{"model": "tiny-neox", "messages": [{"role": "user", "content": "hi"}], "temperature": ' + value
                    + b"}")
        assert resp.status_code == 422 and resp.json()["error"]["param"] == "temperature", resp.text
    resp = post(b'{"model": "tiny-neox", "messages": [')
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "json_invalid"


def test_rate_limit_raises_rate_limit_error(redis_url: str, server: LiveServer) -> None:
    with live_api(redis_url, rate_limit_per_min=1, rate_limit_burst=2) as s:
        c = client(s.url)
        c.models.list()
        c.models.list()
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model="tiny-neox", messages=USER)
        assert e.value.status_code == 429 and int(e.value.response.headers["retry-after"]) >= 1


def test_deep_queue_is_503(redis_url: str, server: LiveServer) -> None:
    r = redis.Redis.from_url(redis_url)
    r.lpush("chat.smollm2-135m", b"{}")  # a queue with a turn in it, and no worker on it
    try:
        with live_api(redis_url, max_queue_depth=0, retry_after_s=3) as s:
            with pytest.raises(openai.InternalServerError) as e:
                client(s.url).chat.completions.create(model="smollm2-135m", messages=USER)
            assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "3"
            assert e.value.code == "queue_full"
            assert client(s.url).chat.completions.create(model="tiny-neox", messages=USER, max_tokens=2).choices
    finally:
        r.delete("chat.smollm2-135m")


def test_stream_client_that_disconnects_cancels_its_turn(server: LiveServer, redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    body = {"model": "smollm2-135m", "messages": USER, "stream": True}  # no worker serves it: the turn waits
    try:
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {KEY_A}"}) as resp:
            first = next(resp.iter_lines())
        tid = first.split('"id": "chatcmpl-')[1].split('"')[0]
        for _ in range(100):
            if r.hget(f"chat:turn:{tid}", "cancel") == "1":
                break
            time.sleep(0.05)
        assert r.hget(f"chat:turn:{tid}", "cancel") == "1"
    finally:
        r.delete("chat.smollm2-135m")
