"""/v1/responses (producer/api/routes_responses.py) with the official openai client, a live server and a real worker:
a response, a chain through previous_response_id stored as one conversation (each request sends only its new
message, and the worker reuses the chain's KV), a fork from an earlier response, the streamed event sequence,
structured outputs through text.format, retrieval, and every client error a 400 naming the field."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest
import redis

from tests.api_live import KEY_B, LiveServer, live_api, openai_client, tiny_worker


@pytest.fixture(scope="module")
def server(redis_url: str) -> Iterator[LiveServer]:
    with tiny_worker(redis_url, sequence_length=1024), live_api(redis_url) as s:
        yield s


def conversation_of(r: redis.Redis, response_id: str) -> str:
    return r.hget(f"chat:turn:{response_id.removeprefix('resp_')}", "conversation").decode()


def test_a_chain_of_responses_is_one_conversation_whose_history_is_reused(oai: openai.OpenAI,
                                                                           redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    first = oai.responses.create(model="tiny-neox", input="Hello there", instructions="Be brief.",
                                 max_output_tokens=6, temperature=0)
    assert first.id.startswith("resp_") and first.object == "response"
    assert first.status in ("completed", "incomplete") and first.output_text == first.output[0].content[0].text
    second = oai.responses.create(model="tiny-neox", input="And then?", previous_response_id=first.id,
                                  max_output_tokens=6, temperature=0)
    assert conversation_of(r, second.id) == conversation_of(r, first.id)  # continued in place
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens  # the history is in
    assert second.usage.input_tokens_details.cached_tokens > 0  # ... and its KV was reused, not prefilled
    cid = conversation_of(r, first.id)
    texts = [json.loads(m)["text"] for m in r.lrange(f"chat:conv:{cid}:messages", 0, -1)]
    assert texts == ["Hello there", first.output_text, "And then?", second.output_text]
    # From the first response again: a fork, a new conversation holding the history up to it.
    fork = oai.responses.create(model="tiny-neox", input="Something else", previous_response_id=first.id,
                                max_output_tokens=4, temperature=0)
    fork_cid = conversation_of(r, fork.id)
    assert fork_cid != cid
    fork_texts = [json.loads(m)["text"] for m in r.lrange(f"chat:conv:{fork_cid}:messages", 0, -1)]
    assert fork_texts == ["Hello there", first.output_text, "Something else", fork.output_text]
    assert r.hget(f"chat:conv:{fork_cid}", "system") == b"Be brief."
    got = oai.responses.retrieve(second.id)
    assert got.output_text == second.output_text and got.status == second.status
    assert got.previous_response_id == first.id  # the chain, as create said it (found by a fresh user: None)
    assert oai.responses.retrieve(first.id).previous_response_id is None
    assert oai.responses.retrieve(fork.id).previous_response_id == first.id


def test_another_callers_response_is_not_found_and_cannot_be_continued(server: LiveServer,
                                                                         oai: openai.OpenAI) -> None:
    mine = oai.responses.create(model="tiny-neox", input="Mine", max_output_tokens=2, temperature=0)
    with openai_client(server.url, KEY_B) as theirs:
        with pytest.raises(openai.NotFoundError):
            theirs.responses.retrieve(mine.id)
        with pytest.raises(openai.NotFoundError):
            theirs.responses.create(model="tiny-neox", input="x", previous_response_id=mine.id, max_output_tokens=2)


def test_a_streamed_response_sends_the_event_sequence(oai: openai.OpenAI) -> None:
    events = list(oai.responses.create(model="tiny-neox", input="Stream please", max_output_tokens=8,
                                       temperature=0, stream=True, extra_body={"ignore_eos": True}))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]  # cut by max_output_tokens
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-4].text == events[-1].response.output[0].content[0].text
    assert [e.sequence_number for e in events] == list(range(1, len(events) + 1))
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"


def test_text_format_json_schema_gives_a_valid_object(oai: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}
    done = oai.responses.create(model="tiny-neox", input="JSON please", max_output_tokens=40, temperature=0,
                                text={"format": {"type": "json_schema", "name": "flag", "schema": schema,
                                                 "strict": True}})
    assert done.status == "completed" and set(json.loads(done.output_text)) == {"ok", "n"}


@pytest.mark.parametrize("kw,param", [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": [{"role": "assistant", "content": "hi"}]}, "input"),
    ({"previous_response_id": "resp_0123456789abcdef0123456789abcdef"}, "previous_response_id"),
    ({"previous_response_id": "chatcmpl-x"}, "previous_response_id"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"max_output_tokens": 5000}, "max_output_tokens"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}}, "text"),
    ({"tools": [{"type": "function", "name": "f"}]}, "tools"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"temperature": -1}, "temperature"),
    # found by the bad-input review: accepted and silently ignored before
    ({"text": {"format": {"type": "json_object"}}, "extra_body": {"grammar": {"type": "regex", "value": "a"}}}, "text"),
    ({"text": {"format": {"type": "json_object", "schema": {"type": "object"}}}}, "text.format"),
    ({"extra_body": {"n": 2}}, "n"),
    ({"extra_body": {"background": True}}, "background"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"max_output_tokens": 5, "extra_body": {"max_tokens": 6}}, "max_output_tokens"),
    ({"input": [{"role": "user", "content": "a"}, {"role": "system", "content": "late"},
                {"role": "user", "content": "b"}]}, "input"),
])
def test_every_client_error_is_400_naming_the_field_and_creates_no_turn(oai: openai.OpenAI, redis_url: str,
                                                                         kw: dict, param: str) -> None:
    r = redis.Redis.from_url(redis_url)
    before = set(r.keys("chat:turn:*"))
    with pytest.raises((openai.BadRequestError, openai.NotFoundError)) as e:
        oai.responses.create(**{"model": "tiny-neox", "input": "hi", **kw})
    assert e.value.body["param"] == param, e.value.body
    assert set(r.keys("chat:turn:*")) == before
