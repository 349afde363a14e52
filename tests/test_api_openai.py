"""/v1 with the official openai client against a live server and a real worker (tiny-neox, sequence
length 256): every client error is a 400 naming the field with no turn created, context overflow as
OpenAI answers it, replies this product made accepted as history, the client's connection followed."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import redis

from tests.api_live import KEY_A, LiveServer, live_api, openai_client, tiny_worker

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
]
USER = [{"role": "user", "content": "hi"}]
IDLE_MODEL = "smollm2-135m"  # a preset no worker serves here


@pytest.fixture(scope="module")
def server(redis_url: str) -> Iterator[LiveServer]:
    with tiny_worker(redis_url), live_api(redis_url) as s:
        yield s


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:  # no flush: the module's worker lives in this db
    c = redis.Redis.from_url(redis_url, decode_responses=True)
    yield c
    c.close()


def turns(r: redis.Redis) -> set[str]:
    return {k for k in r.keys("chat:turn:*") if not k.endswith(":stream")}


def test_completion_maps_history_and_sampling(oai: openai.OpenAI, r: redis.Redis) -> None:
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
    turn = r.hgetall(f"chat:turn:{resp.id.removeprefix('chatcmpl-')}")
    conv = r.hgetall(turn["conv_key"])
    assert conv["system"] == "You are terse." and conv["model"] == "tiny-neox" and conv["owner"]
    assert 0 < r.ttl(turn["conv_key"]) and 0 < r.ttl(turn["conv_key"] + ":messages")
    msgs = r.lrange(turn["conv_key"] + ":messages", 0, -1)
    assert [m.split('"role":"')[1].split('"')[0] for m in msgs] == ["prompter", "assistant", "prompter", "assistant"]
    assert '"Name a colour."' in msgs[2]


def test_a_resent_history_reuses_the_workers_cached_prefix(oai: openai.OpenAI, r: redis.Redis) -> None:
    """Stateless /v1: the client resends the whole conversation each turn; the worker matches its token ids
    against the KV it kept from the previous turn and prefills only what is new (usage and TurnResult say how
    much it reused)."""
    history = [{"role": "system", "content": "You answer in one short line. " * 4},
               {"role": "user", "content": "Tell me about the sea, the sky and the mountains."}]
    first = oai.chat.completions.create(model="tiny-neox", messages=history, max_tokens=8, temperature=0)
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And the rivers?"}]
    second = oai.chat.completions.create(model="tiny-neox", messages=history, max_tokens=8, temperature=0)
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage is not None and 0 < first.usage.prompt_tokens <= cached < second.usage.prompt_tokens
    result = r.hget(f"chat:turn:{second.id.removeprefix('chatcmpl-')}", "result")
    assert result is not None and f'"cached_tokens":{cached}' in result


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
    with httpx.stream("POST", str(oai.base_url.join("chat/completions")), json={**kw, "stream": True},
                      headers={"Authorization": f"Bearer {KEY_A}"}, timeout=30) as raw:
        lines = [ln for ln in raw.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and '"usage"' not in "".join(lines)


def test_models_lists_what_is_served(oai: openai.OpenAI) -> None:
    models = {m.id: m for m in oai.models.list().data}
    assert list(models) == ["tiny-neox"]  # smollm2-135m is a preset, but no worker serves it here
    assert models["tiny-neox"].model_extra["context_length"] == 256
    caps = models["tiny-neox"].model_extra["capabilities"]
    assert caps["structured_outputs"] and caps["tools"] and caps["completions"] and caps["responses"]
    assert caps["max_top_logprobs"] == 20
    assert oai.models.retrieve("tiny-neox").id == "tiny-neox"
    for model in ("gpt-9", IDLE_MODEL):
        with pytest.raises(openai.NotFoundError):
            oai.models.retrieve(model)


def test_unknown_model_unserved_model_and_bad_key(oai: openai.OpenAI, server: LiveServer, r: redis.Redis) -> None:
    before = turns(r)
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="gpt-9", messages=USER)
    assert e.value.status_code == 404 and e.value.code == "model_not_found" and e.value.param == "model"
    t0 = time.monotonic()
    with pytest.raises(openai.InternalServerError) as e5:  # at once, not after a 600 s wait
        oai.chat.completions.create(model=IDLE_MODEL, messages=USER)
    assert time.monotonic() - t0 < 2 and e5.value.status_code == 503 and e5.value.code == "model_not_served"
    with pytest.raises(openai.AuthenticationError) as e2:
        openai_client(server.url, "sk-wrong").chat.completions.create(model="tiny-neox", messages=USER)
    assert e2.value.status_code == 401 and e2.value.type == "authentication_error"
    no_key = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny-neox", "messages": USER})
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "missing_api_key"
    assert turns(r) == before


LONG_HISTORY = [m for i in range(20) for m in ({"role": "user", "content": f"question {i} " + "q" * 30},
                                               {"role": "assistant", "content": f"answer {i} " + "a" * 30})] + USER

# Every client error the official client can send: a 400 naming the field, and no turn created.
CLIENT_ERRORS = [
    ({"temperature": -1}, "temperature", None),
    ({"top_p": 0}, "top_p", None),
    ({"top_p": 1.5}, "top_p", None),
    ({"max_tokens": 0}, "max_tokens", None),
    ({"n": 2}, "n", None),
    ({"messages": []}, "messages", None),
    ({"messages": [{"role": "user", "content": ""}]}, "messages[0].content", None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content",
     None),
    ({"messages": [{"role": "user", "content": "\u200b"}]}, "messages[0].content", None),
    ({"messages": [{"role": "system", "content": "bell \x07"}, *USER]}, "messages[0].content", None),
    ({"messages": [{"role": "user", "content": "nul \x00"}, {"role": "assistant", "content": "?"}, *USER]},
     "messages[0].content", None),
    ({"messages": [*USER, {"role": "assistant", "content": "y" * 64_001}, *USER]}, "messages[1].content", None),
    ({"messages": USER * 4097}, "messages", None),
    ({"stop": [1]}, "stop[0]", None),
    ({"messages": [{"role": "robot", "content": "beep"}]}, "messages[0].role", None),
    ({"messages": [*USER, {"role": "assistant", "content": "hello"}]}, "messages[1].role", None),
    ({"messages": [*USER, {"role": "system", "content": "late"}, *USER]}, "messages[1].role", None),
    ({"messages": [{"role": "user", "content": "bell \x07"}, {"role": "assistant", "content": "?"}, *USER]},
     "messages[0].content", None),
    ({"messages": [{"role": "user", "content": "x" * 16_001}]}, "messages[0].content", None),
    ({"messages": [{"role": "system", "content": ""}, *USER]}, "messages[0].content", None),
    ({"stop": [""]}, "stop", None),
    ({"stop": ""}, "stop", None),  # a single string is checked as a list of one
    ({"stop": "x" * 201}, "stop", None),
    ({"max_tokens": 300, "max_completion_tokens": 2}, "max_completion_tokens", None),  # two different lengths
    ({"extra_body": {"top_k": -3}}, "top_k", None),
    # strict types: a bool is not a number, a string is not a bool
    ({"extra_body": {"top_k": True}}, "top_k", None),
    ({"extra_body": {"stream": "yes"}}, "stream", None),
    ({"extra_body": {"max_tokens": True}}, "max_tokens", None),
    ({"extra_body": {"temperature": "0.5"}}, "temperature", None),
    ({"model": 5}, "model", None),  # `model` is also pydantic's tag for a model member of a union
    ({"model": ""}, "model", None),
    # fields that would change the answer and are not supported yet
    ({"tools": [{"type": "function", "function": {"name": "f b", "parameters": {}}}]}, "tools", None),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]}, "tools", None),
    ({"tools": [{"type": "function", "function": {"name": "f"}}] * 2}, "tools", None),  # the same name twice
    ({"tool_choice": "required"}, "tool_choice", None),  # no tools to choose from
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice", None),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
      "response_format": {"type": "json_object"}}, "tool_choice", None),
    ({"messages": [{"role": "tool", "content": "42"}]}, "messages[0]", None),  # no tool_call_id
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages[0]", None),
    ({"functions": [{"name": "f"}]}, "functions", None),
    ({"top_logprobs": 3}, "top_logprobs", None),  # without logprobs: true
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", None),
    # structured outputs, penalties and logit_bias out of range or malformed
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format", None),
    ({"response_format": {"type": "json_schema"}}, "response_format", None),
    ({"response_format": {"type": "xml"}}, "response_format", None),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}}, "response_format",
     None),
    ({"extra_body": {"grammar": {"type": "regex", "value": "a("}}}, "grammar", None),
    ({"extra_body": {"grammar": {"type": "regex", "value": "a"}}, "response_format": {"type": "json_object"}},
     "grammar", None),
    ({"presence_penalty": 2.5}, "presence_penalty", None),
    ({"frequency_penalty": -3}, "frequency_penalty", None),
    ({"logit_bias": {"42": 101}}, "logit_bias", None),
    ({"logit_bias": {"token": 1}}, "logit_bias", None),
    ({"logit_bias": {"007": 100, "7": -100}}, "logit_bias", None),  # one token twice: which bias would win?
    ({"logit_bias": {"99999": 1}}, "logit_bias", None),  # beyond tiny-neox's vocabulary: known before queuing
    # what the worker would refuse for this model, refused before anything is queued
    ({"max_tokens": 256}, "max_tokens", None),
    ({"max_tokens": 252}, "messages", "context_length_exceeded"),  # the prompt's 5 tokens + 252 > 256
    ({"max_completion_tokens": 5000}, "max_completion_tokens", None),
    ({"extra_body": {"top_k": 100_000}}, "top_k", None),
    ({"messages": [{"role": "system", "content": "rules " * 60}, *USER]}, "messages", None),
    ({"messages": LONG_HISTORY}, "messages", "context_length_exceeded"),
    ({"messages": USER[:0] + [{"role": "user", "content": "x" * 300}], "max_tokens": 10}, "messages",
     "context_length_exceeded"),
]


@pytest.mark.parametrize("kw,param,code", CLIENT_ERRORS, ids=[f"{i}-{c[1]}" for i, c in enumerate(CLIENT_ERRORS)])
def test_every_client_error_is_400_naming_the_field_and_creates_no_turn(
        oai: openai.OpenAI, r: redis.Redis, kw: dict, param: str, code: str | None) -> None:
    before = turns(r)
    kw = {"model": "tiny-neox", "messages": USER, **kw}
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(**kw)
    assert e.value.status_code == 400 and e.value.type == "invalid_request_error"
    assert e.value.param == param or (param.startswith("messages[") is False and e.value.param.startswith(param)), (
        e.value.param, e.value.message)
    assert e.value.code == (code or e.value.code) and e.value.code != "bad_request"
    message = e.value.body["message"]
    assert message.startswith(e.value.param) or e.value.code == "context_length_exceeded", message
    assert "type=" not in message and "input_value" not in message  # no pydantic internals
    assert turns(r) == before


def test_a_bad_single_stop_string_is_named_for_what_is_wrong_with_it(server: LiveServer) -> None:
    for stop, why in [("", "at least 1 character"), ("x" * 201, "at most 200 characters")]:
        resp = httpx.post(server.url + "/v1/chat/completions", timeout=30, headers={"Authorization": f"Bearer {KEY_A}"},
                          json={"model": "tiny-neox", "messages": USER, "max_tokens": 2, "stop": stop})
        assert resp.status_code == 400 and why in resp.json()["error"]["message"], resp.text


def test_fields_openai_allows_null_take_their_default(oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(model="tiny-neox", messages=USER, max_tokens=2, extra_body={
        "stream": None, "n": None, "truncate": None, "stream_options": None, "max_completion_tokens": None})
    assert resp.choices[0].finish_reason in ("length", "stop")
    chunks = list(oai.chat.completions.create(model="tiny-neox", messages=USER, max_tokens=2, stream=True,
                                              stream_options={"include_usage": None}))  # type: ignore[typeddict-item]
    assert chunks[-1].choices and chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_the_max_tokens_is_named_as_the_request_named_it(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="tiny-neox", messages=USER, max_completion_tokens=252)
    assert e.value.code == "context_length_exceeded"
    assert "max_completion_tokens" in e.value.message and "max_tokens" not in e.value.message.replace(
        "max_completion_tokens", "")
    assert oai.chat.completions.create(model="tiny-neox", messages=USER, max_tokens=2,
                                       max_completion_tokens=2).usage.completion_tokens <= 2  # the same in both


def test_context_overflow_says_the_numbers_and_truncate_is_opt_in(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="tiny-neox", messages=LONG_HISTORY, max_tokens=8)
    msg = e.value.message
    assert "maximum context length is 256 tokens" in msg and "and 8 for the output" in msg
    resp = oai.chat.completions.create(model="tiny-neox", messages=LONG_HISTORY, max_tokens=8,
                                       extra_body={"truncate": True})
    dropped = resp.usage.model_extra["dropped_messages"]
    assert dropped > 0 and dropped % 2 == 0  # whole oldest turns, and the response says how many
    assert resp.usage.prompt_tokens + 8 <= 256
    # One message longer than the whole context: its start is cut, and the response says by how much.
    resp = oai.chat.completions.create(model="tiny-neox", messages=[{"role": "user", "content": "word " * 600}],
                                       max_tokens=8, extra_body={"truncate": True})
    extra = resp.usage.model_extra
    assert extra["dropped_messages"] == 0 and extra["truncated_tokens"] > 0
    assert resp.usage.prompt_tokens + 8 <= 256


@pytest.mark.parametrize("messages", [
    [{"role": "assistant", "content": "Hello! How can I help?"}, *USER],  # a history opening with the assistant
    [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Hi!"}, *USER],
    [*USER, {"role": "assistant", "content": None}, *USER],  # LangChain's tool loop shape, without tool calls
    [*USER, {"role": "assistant", "content": ""}, *USER],  # an empty reply (a stop string matched at once)
    [*USER, {"role": "assistant", "content": "odd \x0b bytes \x1c from the model"}, *USER],  # it emitted those
    [*USER, {"role": "assistant", "content": [{"type": "text", "text": "parts"}]}, *USER],
    [{"role": "developer", "content": "Be brief."}, *USER, {"role": "assistant", "content": "ok"}, *USER],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "?"}, *USER],  # an empty earlier message
])
def test_replies_this_product_produced_are_accepted_as_history(oai: openai.OpenAI, messages: list[dict]) -> None:
    resp = oai.chat.completions.create(model="tiny-neox", messages=messages, max_tokens=2)
    assert resp.choices[0].message.content is not None and resp.usage.model_extra["dropped_messages"] == 0


def test_a_tiny_temperature_is_greedy_and_fails_no_turn_beside_it(oai: openai.OpenAI) -> None:
    """A temperature of 1e-40 used to overflow the sampler and fail every turn decoding in its batch."""
    import concurrent.futures

    kw = {"model": "tiny-neox", "messages": USER, "max_tokens": 40}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(oai.chat.completions.create, **kw, temperature=t, extra_body={"top_k": 0})
                   for t in (1e-40, 1.0, 1.0, 1.0)]
        replies = [f.result() for f in futures]
    greedy = oai.chat.completions.create(**kw, temperature=0)
    assert replies[0].choices[0].message.content == greedy.choices[0].message.content
    # A penalty below 1 boosts every prompt token to +inf, <|endoftext|> among them: an empty reply is a
    # fair draw, a failed turn is not.
    extreme = oai.chat.completions.create(**kw, extra_body={"repetition_penalty": 1e-300})
    assert extreme.choices[0].finish_reason in ("stop", "length")
    assert extreme.usage.completion_tokens <= 40


def test_nan_bad_json_and_lone_surrogates_are_400(server: LiveServer, r: redis.Redis) -> None:
    """The openai client refuses to send NaN or lone surrogates, so these go raw."""

    def post(body: bytes) -> httpx.Response:
        return httpx.post(server.url + "/v1/chat/completions", content=body,
                          headers={"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"})

    for value in (b"NaN", b"Infinity"):
        resp = post(b'{"model": "tiny-neox", "messages": [{"role": "user", "content": "hi"}], "temperature": ' + value
                    + b"}")
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "temperature", resp.text
    for bad in (b'{"model": "tiny-neox", "messages": [', b"\xff\xfe{", b"[" * 5000):
        resp = post(bad)
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "json_invalid", resp.text
    before = turns(r)
    for i, role in ((0, "user"), (1, "assistant")):  # JSON can escape what UTF-8 cannot carry
        bad = b'{"role": "' + role.encode() + b'", "content": "a\\ud800b"}'
        msgs = b'{"role": "user", "content": "hi"}, ' * i + bad
        resp = post(b'{"model": "tiny-neox", "messages": [' + msgs + b', {"role": "user", "content": "hi"}]}')
        assert resp.status_code == 400 and resp.json()["error"]["param"] == f"messages[{i}].content", resp.text
    assert turns(r) == before


def test_rate_limit_raises_rate_limit_error(redis_url: str, server: LiveServer) -> None:
    with live_api(redis_url, rate_limit_per_min=1, rate_limit_burst=2) as s:
        c = openai_client(s.url)
        c.models.list()
        c.models.list()
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model="tiny-neox", messages=USER)
        assert e.value.status_code == 429 and int(e.value.response.headers["retry-after"]) >= 1


def test_deep_queue_is_503(redis_url: str, server: LiveServer, r: redis.Redis) -> None:
    with live_api(redis_url, max_queue_depth=0, retry_after_s=3, queue_without_workers=True) as s:
        r.lpush(f"chat.{IDLE_MODEL}", "{}")  # a queue with something in it, and no worker on it
        try:
            with pytest.raises(openai.InternalServerError) as e:
                openai_client(s.url).chat.completions.create(model=IDLE_MODEL, messages=USER)
            assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "3"
            assert e.value.code == "queue_full"
            assert openai_client(s.url).chat.completions.create(model="tiny-neox", messages=USER, max_tokens=2).choices
        finally:
            r.delete(f"chat.{IDLE_MODEL}")


def wait_cancelled(r: redis.Redis, tid: str, within: float) -> float:
    t0 = time.monotonic()
    while r.hget(f"chat:turn:{tid}", "cancel") != "1":
        assert time.monotonic() - t0 < within, r.hgetall(f"chat:turn:{tid}")
        time.sleep(0.02)
    return time.monotonic() - t0


def test_a_client_that_goes_away_has_its_turn_cancelled_streaming_or_not(
        redis_url: str, server: LiveServer, r: redis.Redis) -> None:
    headers = {"Authorization": f"Bearer {KEY_A}"}
    body = {"model": IDLE_MODEL, "messages": USER}  # waits in the queue: only the client's leaving ends it
    with live_api(redis_url, queue_without_workers=True) as s:
        with httpx.stream("POST", s.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=30,
                          headers=headers) as resp:
            first = next(resp.iter_lines())
        tid = first.split('"id": "chatcmpl-')[1].split('"')[0]
        assert wait_cancelled(r, tid, 5) < 2
        seen = set(turns(r))
        gone = threading.Event()

        def impatient() -> None:
            try:
                httpx.post(s.url + "/v1/chat/completions", json=body, headers=headers, timeout=1.0)
            except httpx.TimeoutException:
                gone.set()

        threading.Thread(target=impatient).start()
        end = time.monotonic() + 5
        while not (new := turns(r) - seen):
            assert time.monotonic() < end
            time.sleep(0.01)
        (key,) = new
        assert gone.wait(5)
        left = time.monotonic()
        wait_cancelled(r, key.removeprefix("chat:turn:"), 5)
        assert time.monotonic() - left < 2  # within about a second of the client leaving
        for ended in (tid, key.removeprefix("chat:turn:")):  # no worker held them: they ended, the queue is empty
            assert r.hget(f"chat:turn:{ended}", "status") == "done"
        assert r.llen(f"chat.{IDLE_MODEL}") == 0


def test_stream_keepalive_follows_the_setting(redis_url: str, server: LiveServer, r: redis.Redis) -> None:
    with live_api(redis_url, sse_ping_s=0.2, queue_without_workers=True) as s:
        body = {"model": IDLE_MODEL, "messages": USER, "stream": True}  # waits in the queue
        t0 = time.monotonic()
        pings = 0
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {KEY_A}"}) as resp:
            for line in resp.iter_lines():
                pings += line == ": ping"
                if pings == 3:
                    break
        assert time.monotonic() - t0 < 5
    r.delete(f"chat.{IDLE_MODEL}")


def test_logprobs_come_per_token_streaming_and_not(oai: openai.OpenAI) -> None:
    """One entry per completion token, the greedy token first among its alternatives, alternatives' probabilities
    summing to at most 1, and a streamed reply's logprobs equal to the non-streamed ones."""
    kw = {"model": "tiny-neox", "messages": USER, "max_tokens": 6, "temperature": 0, "logprobs": True,
          "top_logprobs": 3, "extra_body": {"ignore_eos": True}}
    done = oai.chat.completions.create(**kw)
    content = done.choices[0].logprobs.content
    assert len(content) == done.usage.completion_tokens == 6
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == t.logprob <= 0
        assert t.top_logprobs[0].token == t.token and bytes(t.bytes).decode("utf-8", "replace") == t.token
        assert sum(math.exp(a.logprob) for a in t.top_logprobs) <= 1 + 1e-6
    streamed = [lp for c in oai.chat.completions.create(**kw, stream=True) if c.choices and c.choices[0].logprobs
                for lp in c.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]
    plain = oai.chat.completions.create(model="tiny-neox", messages=USER, max_tokens=2)
    assert plain.choices[0].logprobs is None
