"""/v1/completions (producer/api/routes_completions.py) with the official openai client, a live server and a real
worker: a raw prompt with no template (its prompt tokens are the tokenizer's own count), echo, streaming equal to
not, legacy logprobs, structured outputs; every client error a 400 naming the field with nothing queued."""

from __future__ import annotations

import re
from collections.abc import Iterator

import openai
import pytest
import redis

from tests.api_live import LiveServer, live_api, tiny_worker

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def server(redis_url: str) -> Iterator[LiveServer]:
    with tiny_worker(redis_url), live_api(redis_url) as s:
        yield s


def test_a_raw_prompt_is_completed_without_a_template(oai: openai.OpenAI) -> None:
    from worker.pipeline.tiny_neox import build_tokenizer

    done = oai.completions.create(model="tiny-neox", prompt=PROMPT, max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert done.object == "text_completion" and done.id.startswith("cmpl-")
    assert done.usage.prompt_tokens == len(build_tokenizer()(PROMPT)["input_ids"])  # the prompt alone: no markup
    assert done.usage.completion_tokens == 8 and done.choices[0].finish_reason == "length"
    echoed = oai.completions.create(model="tiny-neox", prompt=[PROMPT], max_tokens=8, temperature=0, echo=True,
                                    extra_body={"ignore_eos": True})
    assert echoed.choices[0].text == PROMPT + done.choices[0].text
    default = oai.completions.create(model="tiny-neox", prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True})
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens for completions


def test_streaming_equals_not_and_logprobs_come_in_the_legacy_shape(oai: openai.OpenAI) -> None:
    kw = {"model": "tiny-neox", "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 2,
          "extra_body": {"ignore_eos": True}}
    done = oai.completions.create(**kw)
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    # (tiny-neox's random replies hold partial UTF-8: a token decoded alone may not be its share of the text)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(v) for top, v in zip(lp.top_logprobs,
                                                                                           lp.token_logprobs))
    chunks = list(oai.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 6


def test_a_completion_can_be_held_to_a_regex(oai: openai.OpenAI) -> None:
    done = oai.completions.create(model="tiny-neox", prompt="Answer:", max_tokens=20, temperature=1.0, seed=2,
                                  extra_body={"top_k": 0, "grammar": {"type": "regex", "value": "(yes|no)!"}})
    assert re.fullmatch("(yes|no)!", done.choices[0].text) and done.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("kw,param", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x" * 300}, "prompt"),  # beyond tiny-neox's 256 positions: context_length_exceeded
    ({"max_tokens": 256}, "max_tokens"),
    ({"echo": True, "logprobs": 1}, "logprobs"),
    ({"logprobs": 6}, "logprobs"),
    ({"n": 2}, "n"),
    ({"best_of": 3}, "best_of"),
    ({"suffix": "end"}, "suffix"),
    ({"temperature": -1}, "temperature"),
    ({"logit_bias": {"9999": 1}}, "logit_bias"),
    ({"extra_body": {"truncate": True}}, "truncate"),
    ({"extra_body": {"messages": [{"role": "user", "content": "hi"}]}}, "messages"),
    ({"extra_body": {"tools": [{"type": "function", "function": {"name": "f"}}]}}, "tools"),
])
def test_every_client_error_is_400_naming_the_field_and_creates_no_turn(oai: openai.OpenAI, redis_url: str,
                                                                         kw: dict, param: str) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    before = {k for k in r.keys("chat:turn:*")}
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(**{"model": "tiny-neox", "prompt": PROMPT, **kw})
    assert e.value.status_code == 400 and e.value.param == param, (e.value.param, e.value.message)
    assert e.value.body["message"].startswith(param)
    assert {k for k in r.keys("chat:turn:*")} == before
