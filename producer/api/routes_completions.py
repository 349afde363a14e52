"""/v1/completions: OpenAI's (legacy) text completions, for clients that send a raw prompt.

The prompt is the model's whole input, tokenized as the tokenizer reads it alone (special-token text parsed, BOS
added where it adds one: Codec.encode_raw), with no chat template, system prompt or history; it must fit the
context with `max_tokens` (default 16, as OpenAI's) or it is a 400 `context_length_exceeded`. One prompt per
request (a string, or a list of one). `echo` puts the prompt before the reply's text. `logprobs` (0-5, the
legacy API's) gives the reply tokens' log probabilities in the legacy shape (tokens, token_logprobs, top_logprobs,
text_offset); with `echo` it would need the prompt's too, which this server does not compute: a 400. The sampling
fields, penalties, logit_bias, `response_format` / `grammar` and the extensions are the chat route's.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ConfigDict, Field, ValidationInfo, field_validator
from starlette.concurrency import run_in_threadpool

from producer.api import sse, tools
from producer.api.deps import Authed, Service
from producer.api.errors import from_chat_error
from producer.api.routes_openai import FINISH, End, Piece, StreamOptions, reply_events, usage, wait_for_reply
from producer.api.schemas import SamplingFields, refused
from producer.client import StartedTurn, TurnRequest
from shared.errors import ChatError
from shared.wire import TurnResult

router = APIRouter(prefix="/v1", tags=["openai"])
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(strict=True, extra="ignore")  # OpenAI fields that change nothing are ignored
    model: str = Field(min_length=1, max_length=100)
    prompt: str | list[str]
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=5)  # the legacy API's: top alternatives per token
    n: int | None = Field(1, ge=1, le=1)
    best_of: int | None = Field(None, ge=1, le=1)
    suffix: str | None = None
    truncate: bool | None = None  # the chat route's extension: refused here (a raw prompt is never cut)
    messages: Any = None  # the chat route's: refused here, naming where they go
    tools: Any = None
    tool_choice: Any = None

    _chat_fields = refused("messages", "tools", "tool_choice",
                           why="belongs to /v1/chat/completions, not to a raw completion")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("one prompt per request (a string, or a list of one string)")
        if not (v if isinstance(v, str) else v[0]):
            raise ValueError("must not be empty")
        return v

    @field_validator("logprobs")
    @classmethod
    def _not_with_echo(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and info.data.get("echo"):
            raise ValueError("with echo it would need the prompt's log probabilities, which this server does not "
                             "compute: drop echo or logprobs")
        return v

    _no_suffix = refused("suffix", why="suffix (insertion) is not supported")
    _no_truncate = refused("truncate", why="a raw prompt is never cut: shorten it")

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def legacy_logprobs(res: TurnResult, offset: int) -> dict[str, Any] | None:
    """The legacy `choices[].logprobs`: parallel lists over the reply's tokens; `text_offset` counts characters
    from `offset` (the echoed prompt's length, else 0)."""
    if res.logprobs is None:
        return None
    offsets, at = [], offset
    for t in res.logprobs:
        offsets.append(at)
        at += len(t.token)
    return {"tokens": [t.token for t in res.logprobs], "token_logprobs": [t.logprob for t in res.logprobs],
            "top_logprobs": [_by_text(t.top) for t in res.logprobs], "text_offset": offsets}


def _by_text(top: list[tuple[str, float]]) -> dict[str, float]:
    """The legacy shape keys alternatives by their text: two tokens that decode alike (pieces of one UTF-8
    character both read as U+FFFD) keep the likelier's log probability."""
    out: dict[str, float] = {}
    for text, lp in top:  # most likely first
        out.setdefault(text, lp)
    return out


@router.post("/completions")
async def completions(req: CompletionRequest, request: Request, svc: Service, caller: Authed) -> Response:
    sampling = req.sampling(req.max_tokens or DEFAULT_MAX_TOKENS)
    if req.logprobs is not None:
        sampling = sampling.model_copy(update={"logprobs": req.logprobs})

    def start() -> StartedTurn:
        svc.check_model(req.model)
        return svc.start(TurnRequest(req.text, sampling, model=req.model, owner=caller.id, raw=True, truncate=False,
                                     ttl_s=svc.settings.openai_conversation_ttl_s, text_field="prompt",
                                     grammar_field=req.grammar_param))

    try:
        turn = await run_in_threadpool(start)
    except ChatError as e:
        raise from_chat_error(e, openai=True) from None
    base = {"id": f"cmpl-{turn.turn_id}", "created": int(time.time()), "model": req.model}
    echo = req.text if req.echo else ""
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return sse.response(stream(svc, turn.turn_id, base, include_usage, echo))
    res = await wait_for_reply(svc, request, turn.turn_id)
    if res is None:  # the client left; its turn was cancelled
        return Response(status_code=499)
    choice = {"index": 0, "text": echo + res.text, "finish_reason": FINISH[res.finish_reason],
              "logprobs": legacy_logprobs(res, len(echo))}
    return JSONResponse({**base, "object": "text_completion", "choices": [choice], "usage": usage(res),
                         "system_fingerprint": res.worker or None})


async def stream(svc: Any, tid: str, base: dict[str, Any], include_usage: bool, echo: str) -> AsyncIterator[str]:
    """text_completion chunks (the echoed prompt first), then `data: [DONE]`."""

    def chunk(text: str, finish: str | None = None, lp: dict[str, Any] | None = None) -> str:
        return sse.frame({**base, "object": "text_completion",
                          "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": lp}]})

    if echo:
        yield chunk(echo)
    async for item in reply_events(svc, tid, tools.ReplyShaper(tid)):
        if isinstance(item, str):
            yield item
        elif isinstance(item, Piece):
            yield chunk(item.delta.get("content", ""))
        elif isinstance(item, End):
            yield chunk("", item.finish, legacy_logprobs(item.result, len(echo)))
            if include_usage:
                yield sse.frame({**base, "object": "text_completion", "choices": [], "usage": usage(item.result)})
