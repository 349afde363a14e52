"""LangChain against /v1 on SmolLM2-135M, as LangChain users call it: `with_structured_output` returns a valid
object (producer/api/schemas.py's response_format, enforced by constrained decoding), `bind_tools` with a required
choice returns a valid call and a whole tool round trip answers (producer/api/tools.py). Its own module: one
in-process worker per process at a time (the tiny-neox modules hold theirs for their whole module)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import pytest
import redis
from pydantic import BaseModel, Field

from tests.api_live import KEY_A, LiveServer, live_api

pytestmark = pytest.mark.smollm2


@pytest.fixture(scope="module")
def smol_server(redis_url: str) -> Iterator[LiveServer]:
    from producer.embedded import InProcessWorker
    from tests.conftest import tiny_settings

    redis.Redis.from_url(redis_url).flushdb()
    worker = InProcessWorker(tiny_settings(redis_url, model="smollm2-135m", device="cpu", slots=2)).start()
    try:
        with live_api(redis_url) as s:
            yield s
    finally:
        worker.stop()
        redis.Redis.from_url(redis_url).flushdb()


@pytest.mark.smollm2
def test_langchains_with_structured_output_returns_a_valid_object_on_smollm2(smol_server: LiveServer) -> None:
    from langchain_openai import ChatOpenAI

    class Person(BaseModel):
        """Someone from the question."""

        name: str = Field(description="the person's name")
        age: int = Field(description="age in years")
        city: Literal["Paris", "London", "Rome"]

    llm = ChatOpenAI(model="smollm2-135m", base_url=smol_server.url + "/v1", api_key=KEY_A, temperature=0,
                     max_tokens=80, max_retries=0, timeout=120)
    got = llm.with_structured_output(Person).invoke("Alice is 31 and lives in Paris. Extract her details.")
    assert isinstance(got, Person), got
    assert got.city in ("Paris", "London", "Rome")


@pytest.mark.smollm2
def test_langchains_bind_tools_with_a_required_choice_returns_a_valid_call(smol_server: LiveServer) -> None:
    from langchain_core.messages import ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b

    llm = ChatOpenAI(model="smollm2-135m", base_url=smol_server.url + "/v1", api_key=KEY_A, temperature=0,
                     max_tokens=60, max_retries=0, timeout=120)
    question = "What is 6 times 7?"
    msg = llm.bind_tools([multiply], tool_choice="required").invoke(question)
    assert len(msg.tool_calls) == 1 and msg.tool_calls[0]["name"] == "multiply", msg
    args = msg.tool_calls[0]["args"]
    assert set(args) == {"a", "b"} and all(isinstance(v, int) for v in args.values())
    result = multiply.invoke(args)
    answer = llm.bind_tools([multiply]).invoke([("user", question), msg,
                                                ToolMessage(str(result), tool_call_id=msg.tool_calls[0]["id"])])
    assert answer.content or answer.tool_calls  # the round trip came back with an answer
