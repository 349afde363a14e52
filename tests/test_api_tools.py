"""producer/api/tools.py through /v1 with a live server and a real worker: tool_choice required and named return a
call whose arguments validate (streaming deltas reassemble to the same call), auto turns `<tool_call>` blocks into
calls, a whole round trip (call -> tool message -> answer) renders and answers, none shows no tools; LangChain's
bind_tools on SmolLM2. The reply shaping itself (streamed calls, held-back tags) is tested without a server."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Literal

import httpx
import jsonschema
import openai
import pytest

from producer.api import tools
from producer.api.routes_openai import ChatCompletionRequest, split
from tests.api_live import KEY_A, LiveServer, live_api, tiny_worker

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(redis_url: str) -> Iterator[LiveServer]:
    # The tools' prompt takes ~700 of tiny-neox's byte tokens: a longer sequence than its preset's 256.
    with tiny_worker(redis_url, sequence_length=1536), live_api(redis_url) as s:
        yield s


def _schema(name: str) -> dict:
    return next(t["function"]["parameters"] for t in (WEATHER, TIME) if t["function"]["name"] == name)


def test_required_and_named_choices_return_a_call_whose_arguments_validate(oai: openai.OpenAI) -> None:
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        for seed in range(2):
            done = oai.chat.completions.create(model="tiny-neox", messages=USER, tools=[WEATHER, TIME],
                                               tool_choice=choice, max_tokens=200, temperature=1.0, seed=seed,
                                               extra_body={"top_k": 0})
            choice0 = done.choices[0]
            assert choice0.finish_reason == "tool_calls", choice0
            (call,) = choice0.message.tool_calls
            assert choice0.message.content is None and call.id.startswith("call_") and call.type == "function"
            if isinstance(choice, dict):
                assert call.function.name == "get_time"
            jsonschema.validate(json.loads(call.function.arguments), _schema(call.function.name))


def test_streamed_tool_call_deltas_reassemble_to_the_same_call(oai: openai.OpenAI) -> None:
    kw = {"model": "tiny-neox", "messages": USER, "tools": [WEATHER, TIME], "max_tokens": 200, "temperature": 0,
          "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}  # the longer arguments
    whole = oai.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    chunks = list(oai.chat.completions.create(**kw, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == whole.function.name and deltas[0].type == "function"
    assert len(deltas) > 2  # the arguments came in pieces, as OpenAI streams them
    assert "".join(d.function.arguments or "" for d in deltas) == whole.function.arguments
    assert {d.index for d in deltas} == {0}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)


def test_a_tool_round_trip_renders_and_gets_an_answer(oai: openai.OpenAI) -> None:
    """call -> the client runs it -> an assistant message with tool_calls and null content, a tool message -> the
    model answers (auto) as text."""
    first = oai.chat.completions.create(model="tiny-neox", messages=USER, tools=[WEATHER], tool_choice="required",
                                        max_tokens=200, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp": 21, "sky": "clear"})}]
    answer = oai.chat.completions.create(model="tiny-neox", messages=messages, tools=[WEATHER], max_tokens=8,
                                         temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result are in the prompt
    none = oai.chat.completions.create(model="tiny-neox", messages=USER, tools=[WEATHER], tool_choice="none",
                                       max_tokens=4, temperature=0)
    plain = oai.chat.completions.create(model="tiny-neox", messages=USER, max_tokens=4, temperature=0)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens  # none: the tools are not shown
    assert none.choices[0].message.tool_calls is None


def test_a_round_trips_messages_render_as_the_documented_prompt() -> None:
    req = ChatCompletionRequest.model_validate({"model": "m", "tools": [WEATHER], "messages": [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "21C"},
        {"role": "tool", "tool_call_id": "c2", "content": "25C"}]})
    system, history, last, index = split(req.messages)
    assert system is None and index == 2  # the two results are one user turn, named by the first
    assert history[1].text == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                               '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>')
    assert last == "<tool_response>\n21C\n</tool_response>\n<tool_response>\n25C\n</tool_response>"
    assert '"name": "get_weather"' in tools.system_prompt(req.tools_shown) and "<tools>" in tools.system_prompt(
        req.tools_shown)


def test_auto_reads_tool_call_blocks_and_streams_text_until_a_tag_may_start() -> None:
    parsed_tools = [tools.Tool.model_validate(WEATHER)]
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}\n' \
           '</tool_call>'
    got = tools.parse_reply(text, "t1", parsed_tools)
    assert got.content == "Let me check." and len(got.calls) == 1 and got.calls[0]["id"] == "call_t1_0"
    assert json.loads(got.calls[0]["function"]["arguments"]) == {"city": "Oslo", "unit": "C"}
    unknown = tools.parse_reply(text.replace("get_weather", "launch"), "t1", parsed_tools)
    assert unknown.calls == [] and unknown.content == text.replace("get_weather", "launch")  # not a tool: text
    shaper = tools.ReplyShaper("t1", parsed_tools)
    sent = [d for piece in ("Let me check.\n<tool", "_call>\n{", text[len("Let me check.\n<tool_call>\n{"):])
            for d in shaper.feed(piece)]
    assert sent == [{"content": "Let me check.\n"}]  # "<tool" was held back: it became a call
    last, finish = shaper.finish("stop")
    assert finish == "tool_calls" and last[0]["tool_calls"][0]["function"]["name"] == "get_weather"
    plain = tools.ReplyShaper("t2", parsed_tools)
    out = plain.feed("a <b") + plain.feed("> c <to") + plain.finish("stop")[0]
    assert "".join(d["content"] for d in out) == "a <b> c <to"  # held back, then sent when it was not a tag


def test_a_constrained_call_cut_by_max_tokens_is_text_with_finish_length(oai: openai.OpenAI) -> None:
    done = oai.chat.completions.create(model="tiny-neox", messages=USER, tools=[WEATHER], tool_choice="required",
                                       max_tokens=5, temperature=0)
    assert done.choices[0].finish_reason == "length"
    assert done.choices[0].message.tool_calls is None and done.choices[0].message.content == "<tool"  # 5 bytes


def test_the_conversation_routes_take_tools_and_tool_results(server: LiveServer) -> None:
    """/api: a message with tools and a required choice -> the turn's tool_calls (from its stored reply, the same
    ids every read); the result posted back with tool_call_id -> stored as a tool response, answered."""
    headers = {"Authorization": f"Bearer {KEY_A}"}
    cid = httpx.post(f"{server.url}/api/conversations", headers=headers, json={"model": "tiny-neox"}).json()["id"]
    url = f"{server.url}/api/conversations/{cid}/messages"
    created = httpx.post(url, headers=headers, json={"content": "Weather in Paris?", "tools": [WEATHER],
                                                     "tool_choice": "required", "temperature": 0, "max_tokens": 200})
    assert created.status_code == 202, created.text
    turn = _finished(server, cid, created.json()["turn_id"])
    (call,) = turn["tool_calls"]
    assert call["function"]["name"] == "get_weather" and call["id"] == _finished(server, cid, turn["id"])[
        "tool_calls"][0]["id"]
    jsonschema.validate(json.loads(call["function"]["arguments"]), _schema("get_weather"))
    answer = httpx.post(url, headers=headers, json={"content": '{"temp": 21}', "tool_call_id": call["id"],
                                                    "tools": [WEATHER], "temperature": 0, "max_tokens": 5})
    assert _finished(server, cid, answer.json()["turn_id"])["status"] == "done"
    stored = [m["content"] for m in httpx.get(url, headers=headers).json()["messages"]]
    assert stored[1].startswith("<tool_call>\n") and stored[2] == '<tool_response>\n{"temp": 21}\n</tool_response>'
    bad = httpx.post(url, headers=headers, json={"content": "x", "tools": [WEATHER],
                                                 "tool_choice": {"type": "function", "function": {"name": "nope"}}})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "tool_choice", bad.text


def _finished(server: LiveServer, cid: str, tid: str) -> dict:
    end = time.monotonic() + 60
    while time.monotonic() < end:
        turn = httpx.get(f"{server.url}/api/conversations/{cid}/turns/{tid}",
                         headers={"Authorization": f"Bearer {KEY_A}"}).json()
        if turn["status"] in ("done", "failed"):
            return turn
        time.sleep(0.05)
    raise AssertionError("the turn did not finish")


def test_nested_models_parameters_and_non_object_parameters(oai: openai.OpenAI) -> None:
    """Parameters with `$defs` (pydantic's nested models) keep their references under a required call (they were
    refused, the refs no longer resolving); parameters that are not an object schema are refused naming them, and
    `{}` means no arguments (found by the bad-input review: `{}` gave `"arguments": true`)."""
    from pydantic import BaseModel

    class Item(BaseModel):
        n: int
        unit: Literal["kg", "g"]

    class Order(BaseModel):
        item: Item
        extra: list[Item] = []

    nested = {"type": "function", "function": {"name": "order", "parameters": Order.model_json_schema()}}
    done = oai.chat.completions.create(model="tiny-neox", messages=USER, tools=[nested], tool_choice="required",
                                       max_tokens=300, temperature=0)
    (call,) = done.choices[0].message.tool_calls
    Order.model_validate_json(call.function.arguments)
    jsonschema.validate(json.loads(call.function.arguments), Order.model_json_schema())
    empty = {"type": "function", "function": {"name": "ping", "parameters": {}}}
    done = oai.chat.completions.create(model="tiny-neox", messages=USER, tools=[empty], tool_choice="required",
                                       max_tokens=60, temperature=0)
    assert json.loads(done.choices[0].message.tool_calls[0].function.arguments) == {}
    for params in ({"type": "string"}, {"type": "array", "items": {}}, {"properties": {"a": {}}}):
        with pytest.raises(openai.BadRequestError) as e:
            oai.chat.completions.create(model="tiny-neox", messages=USER, tool_choice="required", max_tokens=4,
                                        tools=[{"type": "function", "function": {"name": "f", "parameters": params}}])
        assert e.value.body["param"] == "tools[0].function.parameters", e.value.body
