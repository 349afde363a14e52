"""Structured outputs, penalties and logit_bias through the HTTP API, a live server and a real worker: the official
openai client's `parse` (json_schema, strict) and json_object on /v1, TGI's `grammar` and OpenAI's
`response_format` on the conversation routes, logit_bias steering the reply; and LangChain's
`with_structured_output` on SmolLM2-135M, as LangChain users call it."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from tests.api_live import KEY_A, LiveServer, live_api, tiny_worker

USER = [{"role": "user", "content": "Describe a pet as JSON."}]


class Pet(BaseModel):
    model_config = ConfigDict(extra="forbid")  # additionalProperties false: a bounded reply
    name: str = Field(max_length=8)
    kind: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)
    tags: list[Literal["old", "young", "fluffy"]] = Field(max_length=2)


@pytest.fixture(scope="module")
def server(redis_url: str) -> Iterator[LiveServer]:
    with tiny_worker(redis_url), live_api(redis_url) as s:
        yield s


def test_the_openai_clients_parse_returns_a_valid_object(oai: openai.OpenAI) -> None:
    """`client.chat.completions.parse(response_format=PydanticModel)` sends a strict json_schema and parses the
    reply into the model: it must always validate (sampled, several seeds)."""
    for seed in range(3):
        done = oai.chat.completions.parse(model="tiny-neox", messages=USER, response_format=Pet, max_tokens=120,
                                          temperature=1.0, seed=seed, extra_body={"top_k": 0})
        choice = done.choices[0]
        assert choice.finish_reason == "stop", choice
        assert isinstance(choice.message.parsed, Pet)
        assert Pet.model_validate_json(choice.message.content) == choice.message.parsed


def test_json_object_streams_one_json_object(oai: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}
    chunks = list(oai.chat.completions.create(
        model="tiny-neox", messages=USER, max_tokens=60, temperature=0, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "flag", "schema": schema, "strict": True}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert set(json.loads(text)) == {"ok", "n"}
    done = oai.chat.completions.create(model="tiny-neox", messages=USER, max_tokens=200, temperature=0,
                                       response_format={"type": "json_object"})
    if done.choices[0].finish_reason == "stop":  # an object's strings are unbounded: may run to max_tokens
        assert isinstance(json.loads(done.choices[0].message.content), dict)
    else:
        assert done.choices[0].message.content.startswith("{")


def test_logit_bias_and_penalties_steer_the_reply(oai: openai.OpenAI) -> None:
    """+100 on one token id makes every reply token that one, whichever id it is (tiny-neox's byte tokenizer: one
    token per character here); penalties on the reply's own tokens make a greedy reply less repetitive."""
    forced = [oai.chat.completions.create(model="tiny-neox", messages=USER, max_tokens=6, temperature=0,
                                          logit_bias={token: 100}, extra_body={"ignore_eos": True})
              .choices[0].message.content for token in ("69", "70")]
    assert all(len(c) == 6 and len(set(c)) == 1 for c in forced) and forced[0] != forced[1], forced
    replies = [oai.chat.completions.create(model="tiny-neox", messages=USER, max_tokens=30, temperature=0,
                                           extra_body={"ignore_eos": True}, **penalties).choices[0].message.content
               for penalties in ({}, {"frequency_penalty": 2.0, "presence_penalty": 2.0})]
    assert len(set(replies[1])) > len(set(replies[0])), replies  # more distinct characters when penalised


def _turn_result(server: LiveServer, cid: str, tid: str) -> dict:
    headers = {"Authorization": f"Bearer {KEY_A}"}
    end = time.monotonic() + 60
    while time.monotonic() < end:
        turn = httpx.get(f"{server.url}/api/conversations/{cid}/turns/{tid}", headers=headers, timeout=30).json()
        if turn["status"] in ("done", "failed"):
            return turn
        time.sleep(0.05)
    raise AssertionError("the turn did not finish")


def test_the_conversation_routes_take_a_grammar_and_a_response_format(server: LiveServer) -> None:
    headers = {"Authorization": f"Bearer {KEY_A}"}
    cid = httpx.post(f"{server.url}/api/conversations", headers=headers, json={"model": "tiny-neox"}).json()["id"]
    url = f"{server.url}/api/conversations/{cid}/messages"
    pattern = r"(yes|no): [0-9]{1,3}"
    created = httpx.post(url, headers=headers, json={"content": "answer", "temperature": 1.5, "top_k": 0, "seed": 4,
                                                     "grammar": {"type": "regex", "value": pattern}})
    assert created.status_code == 202, created.text
    turn = _turn_result(server, cid, created.json()["turn_id"])
    assert turn["status"] == "done" and re.fullmatch(pattern, turn["reply"]), turn
    created = httpx.post(url, headers=headers, json={
        "content": "as JSON", "temperature": 0, "max_tokens": 150,
        "response_format": {"type": "json_schema", "json_schema": {"name": "pet", "schema": Pet.model_json_schema()}}})
    turn = _turn_result(server, cid, created.json()["turn_id"])
    assert turn["status"] == "done" and turn["finish_reason"] == "end_key", turn
    Pet.model_validate_json(turn["reply"])
    # A bad grammar is the request's 422, naming it, and nothing is queued or stored.
    before = httpx.get(url, headers=headers).json()
    bad = httpx.post(url, headers=headers, json={"content": "x", "grammar": {"type": "regex", "value": "(("}})
    assert bad.status_code == 422 and "grammar" in bad.text and "invalid regex" in bad.text, bad.text
    assert httpx.get(url, headers=headers).json() == before


def test_a_strict_schema_that_leaves_objects_open_is_closed(oai: openai.OpenAI) -> None:
    """`strict: true` with a schema written without `additionalProperties: false` (a plain pydantic schema): held
    to its listed properties, as OpenAI's strict mode means (found by a fresh user: extra and repeated keys)."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    for seed in range(3):
        done = oai.chat.completions.create(
            model="tiny-neox", messages=USER, max_tokens=40, temperature=1.0, seed=seed, extra_body={"top_k": 0},
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}})
        assert list(json.loads(done.choices[0].message.content)) == ["ok"]


def test_logprobs_under_a_grammar_list_only_tokens_that_could_be_drawn(oai: openai.OpenAI) -> None:
    done = oai.chat.completions.create(model="tiny-neox", messages=USER, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=20, extra_body={"grammar": {"type": "regex", "value": "(ab|ac)d"}})
    content = done.choices[0].logprobs.content
    assert done.choices[0].message.content in ("abd", "acd") and len(content) == 3
    assert [len(t.top_logprobs) for t in content] == [1, 2, 1]  # the mask left 1, then 2, then 1 candidates
    assert all(a.logprob > -1e30 for t in content for a in t.top_logprobs)
