"""/v1: the OpenAI chat-completions API, so OpenAI clients and tools work unchanged.

A request is stateless: it becomes an internal conversation (system message, earlier messages), and
its last user message is sent as the turn. Like OpenAI, a conversation that does not fit the model's
context is refused (400 `context_length_exceeded`, with the numbers) unless the request opts in to
dropping its oldest turns with the extension field `truncate: true` (as TGI's `truncate`); the
response then says how many messages were left out (`usage.dropped_messages`). Penalties, logit_bias and
`response_format` (structured outputs, enforced by constrained decoding) are OpenAI's; `top_k`,
`repetition_penalty` and `grammar` (TGI's) are accepted as extensions. Fields that would change the answer's shape
or sampling and that this server does not implement yet are a 400 naming the field, never ignored.
Finish reasons: end_key and stop -> "stop", length and cancelled (cut short) -> "length".

The client's connection is followed: a client that goes away (streaming or not) has its turn
cancelled within about a second.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from starlette.concurrency import run_in_threadpool

from producer.api import sse
from producer.api.deps import Authed, Service
from producer.api.errors import ApiError, error_body, from_chat_error
from producer.api.schemas import SamplingFields
from producer.api.service import ChatService
from producer.client import StartedTurn, TurnRequest
from producer.reader import Append, Done, Error, ReplyAssembler, Restart, afollow
from shared.errors import ChatError, first_error
from shared.messages import ChatMessage, Role, check_text, is_blank
from shared.sampling import MaxTokens
from shared.wire import FinishReason, TurnResult

router = APIRouter(prefix="/v1", tags=["openai"])

FINISH = {
    FinishReason.end_key: "stop",
    FinishReason.stop: "stop",
    FinishReason.length: "length",
    FinishReason.cancelled: "length",
}
ROLES = {"system": Role.system, "developer": Role.system, "user": Role.prompter, "assistant": Role.assistant}
STRICT = ConfigDict(strict=True, extra="forbid")


MAX_MESSAGES = 4096  # more can never fit a context (every message costs at least one token of markup)


class Message(BaseModel):
    """One message as OpenAI clients send it. `content` is a string, null, or a list of text parts (joined);
    it may be null or empty on an assistant message (a reply this product produced can be empty); tool
    calls and tool results are not supported yet."""

    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | None = None
    name: str | None = None  # accepted, not used
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, v: Any) -> Any:
        if not isinstance(v, list):
            return v
        for part in v:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"only text content parts are supported (got {str(kind)[:40]!r})")
        return "".join(p["text"] for p in v)

    @model_validator(mode="after")
    def _supported(self) -> Message:
        if self.role == "tool" or self.tool_call_id is not None:
            raise ValueError("tool results are not supported yet (role 'tool')")
        if self.tool_calls:
            raise ValueError("tool calls are not supported yet (assistant 'tool_calls')")
        return self

    @property
    def text(self) -> str:
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool | None = False  # null = false, as OpenAI reads it


class ChatCompletionRequest(SamplingFields):
    # Fields OpenAI clients send that do not change the answer (user, metadata, store, service_tier, ...)
    # are ignored; those that would change it are declared below and refused unless left at their default.
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str = Field(min_length=1, max_length=100)
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    # OpenAI documents these as "or null": null is their default.
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(1, ge=1, le=1)
    max_completion_tokens: MaxTokens | None = None  # OpenAI's newer name for max_tokens
    truncate: bool | None = False  # extension: drop the oldest turns to fit the context instead of refusing
    # Not supported yet (the OpenAI-surface issue implements them): a non-default value is a 400 naming it.
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None

    @field_validator("max_completion_tokens")
    @classmethod
    def _one_max_tokens(cls, v: int | None, info: ValidationInfo) -> int | None:
        given = info.data.get("max_tokens")  # validated before: a field of SamplingFields
        if v is not None and given is not None and v != given:
            raise ValueError(f"differs from max_tokens ({given}): give one of them (max_completion_tokens is "
                             "its newer name), or the same value in both")
        return v

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, v: list[Any] | None) -> list[Any] | None:
        if v:
            raise ValueError("tools are not supported yet")
        return v

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, v: Any) -> Any:
        if v not in (None, "none", "auto"):
            raise ValueError("tool choice is not supported yet (tools are not)")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("logprobs are not supported yet")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, v: int | None) -> int | None:
        if v:
            raise ValueError("logprobs are not supported yet")
        return v

    @field_validator("modalities")
    @classmethod
    def _text_out(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and v != ["text"]:
            raise ValueError("only text output is supported")
        return v

    @field_validator("audio")
    @classmethod
    def _no_audio(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            raise ValueError("audio output is not supported")
        return v


def split(messages: list[Message]) -> tuple[str | None, list[ChatMessage], str, int]:
    """(system prompt, earlier messages, the last user message, its index). Raises ApiError naming the
    message that breaks a rule."""
    sys_parts: list[str] = []
    i = 0
    while i < len(messages) and ROLES[messages[i].role] is Role.system:
        sys_parts.append(messages[i].text)
        i += 1
    rest = messages[i:]
    for j, m in enumerate(rest):
        if ROLES[m.role] is Role.system:
            raise ApiError(422, f"messages[{i + j}].role: a system message may only come before the others",
                           param=f"messages[{i + j}].role")
    last = len(messages) - 1
    if not rest or rest[-1].role != "user":
        raise ApiError(422, f"messages[{last}].role: the last message must be a user message",
                       param=f"messages[{last}].role")
    history = []
    for j, m in enumerate(rest[:-1]):
        try:
            history.append(ChatMessage(role=ROLES[m.role], text=m.text))
        except ValidationError as e:
            why = first_error(e).msg.removeprefix("text: ")
            raise ApiError(422, f"messages[{i + j}].content: {why}", param=f"messages[{i + j}].content") from None
    for k, part in enumerate(sys_parts):
        field = f"messages[{k}].content"
        if is_blank(part):
            raise ApiError(422, f"{field}: a system message must not be empty", param=field)
        try:
            check_text(part, field=field)
        except ValueError as e:
            raise ApiError(422, str(e), param=field) from None
    return ("\n\n".join(sys_parts) or None), history, rest[-1].text, last


def usage(res: TurnResult) -> dict[str, Any]:
    """OpenAI's usage object (cached prompt tokens where OpenAI puts them) and our two extensions."""
    return {
        "prompt_tokens": res.prompt_tokens,
        "completion_tokens": res.completion_tokens,
        "total_tokens": res.prompt_tokens + res.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": res.cached_tokens},
        "dropped_messages": res.dropped_messages,
        "truncated_tokens": res.truncated_tokens,
    }


def model_entry(m: dict[str, Any]) -> dict[str, Any]:
    return {"id": m["id"], "object": "model", "created": 0, "owned_by": "chat-worker-pool",
            "context_length": m["context_length"], "workers": m["workers"]}


@router.get("/models")
def list_models(svc: Service, caller: Authed) -> dict[str, Any]:
    """The models a live worker serves now."""
    return {"object": "list", "data": [model_entry(m) for m in svc.models(served_only=True)]}


@router.get("/models/{model}")
def get_model(model: str, svc: Service, caller: Authed) -> dict[str, Any]:
    for m in svc.models(served_only=True):
        if m["id"] == model:
            return model_entry(m)
    svc.check_model(model)
    raise ApiError(404, f"model {model!r}: no live worker serves it", param="model", code="model_not_found")


@router.post("/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request, svc: Service, caller: Authed) -> Response:
    system, history, last, index = split(req.messages)
    sampling = req.sampling(req.max_completion_tokens)

    def start() -> StartedTurn:  # one hop to the thread pool for both (each hop is a wake-up under load)
        svc.check_model(req.model)
        return svc.start(TurnRequest(
            last, sampling, model=req.model, system=system, history=tuple(history), owner=caller.id,
            ttl_s=svc.settings.openai_conversation_ttl_s, truncate=bool(req.truncate),
            text_field=f"messages[{index}].content"))

    try:
        turn = await run_in_threadpool(start)
    except ChatError as e:  # named as this request named it
        names = {"max_tokens": "max_completion_tokens"} if req.max_completion_tokens is not None else {}
        raise from_chat_error(e, openai=True, names=names) from None
    tid = turn.turn_id
    base = {"id": f"chatcmpl-{tid}", "created": int(time.time()), "model": req.model}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return sse.response(stream(svc, request, tid, base, include_usage))
    res = await wait_for_reply(svc, request, tid)
    if res is None:  # the client left; its turn was cancelled
        return Response(status_code=499)
    return JSONResponse(
        {
            **base,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": res.text},
                    "finish_reason": FINISH[res.finish_reason],
                    "logprobs": None,
                }
            ],
            "usage": usage(res),
            "system_fingerprint": res.worker or None,
        }
    )


async def _outcome(svc: ChatService, tid: str) -> TurnResult:
    async for ev in afollow(svc.ar, svc.keys, tid, svc.aqueue_position, outage_s=svc.settings.redis_outage_s):
        if ev is None:
            continue
        if ev.kind == "done" and ev.result is not None:
            return ev.result
        if ev.kind == "error":
            raise ApiError(500, ev.error or "the turn failed", code="turn_failed")
    raise ApiError(500, "the turn's stream ended without a result", code="turn_failed")


async def client_gone(request: Request) -> None:
    """Returns when the client closes its connection (the body has been read: what comes next is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel(svc: ChatService, tid: str) -> None:
    await run_in_threadpool(svc.store.cancel, tid)


async def wait_for_reply(svc: ChatService, request: Request, tid: str) -> TurnResult | None:
    """The turn's result; None if the client left first (the turn is then cancelled). On shutdown it waits
    for the reply up to the grace, then cancels the turn and answers 503 (a retry makes a new one)."""
    outcome = asyncio.ensure_future(_outcome(svc, tid))
    gone = asyncio.ensure_future(client_gone(request))
    draining = asyncio.ensure_future(svc.draining.wait())
    deadline = time.monotonic() + svc.settings.completion_timeout_s
    try:
        done, _ = await asyncio.wait({outcome, gone, draining}, timeout=svc.settings.completion_timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        if draining in done and outcome not in done:
            grace = max(0.0, min(deadline - time.monotonic(), svc.settings.api_shutdown_grace_s - 1.0))
            done, _ = await asyncio.wait({outcome, gone}, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                await cancel(svc, tid)
                raise ApiError(503, "the server is restarting: the turn was cancelled, send the request again",
                               code="server_shutting_down", headers={"Retry-After": "1"})
        if outcome in done:
            return outcome.result()
        if gone in done:
            await cancel(svc, tid)
            return None
        await cancel(svc, tid)
        raise ApiError(504, f"no reply within {svc.settings.completion_timeout_s:g}s; the turn was cancelled")
    finally:
        for t in (outcome, gone, draining):
            t.cancel()


async def stream(
    svc: ChatService, request: Request, tid: str, base: dict[str, Any], include_usage: bool
) -> AsyncIterator[str]:
    """chat.completion.chunk events, then `data: [DONE]`. If a worker is lost mid-turn, the new attempt
    continues the text seamlessly while it agrees with what was sent; if it diverges, the stream ends
    with an error (text already sent cannot be taken back) and the turn is cancelled."""

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return sse.frame({**base, "object": "chat.completion.chunk", "choices": [choice], **extra})

    def error(status: int, message: str, code: str) -> str:
        return sse.frame(error_body(status, message, code=code))

    ping = sse.Pinger(svc.settings.sse_ping_s)
    asm = ReplyAssembler()
    finished = False  # the turn ended (done or error) and the client was told
    drain_end: float | None = None
    yield chunk({"role": "assistant", "content": ""})
    try:
        async for ev in afollow(svc.ar, svc.keys, tid, svc.aqueue_position, outage_s=svc.settings.redis_outage_s):
            if svc.draining.is_set():
                drain_end = drain_end or time.monotonic() + max(0.0, svc.settings.api_shutdown_grace_s - 1.0)
                if time.monotonic() >= drain_end:
                    yield error(503, "the server is restarting: the turn was cancelled, send the request again",
                                "server_shutting_down")
                    break  # not finished: cancelled below
            if ev is None:
                if ping.due():
                    yield sse.PING
                continue
            diverged = False
            for up in asm.feed(ev):
                ping.sent_now()
                if isinstance(up, Append):
                    yield chunk({"content": up.text})
                elif isinstance(up, Restart):
                    diverged = True
                    yield error(500, "the turn was restarted on another worker and its reply diverged from what "
                                "was already sent; send the request again", "diverged")
                    break
                elif isinstance(up, Done):
                    finished = True
                    res = up.result
                    if up.tail:
                        yield chunk({"content": up.tail})
                    yield chunk({}, FINISH[res.finish_reason], system_fingerprint=res.worker or None)
                    if include_usage:
                        yield sse.frame({**base, "object": "chat.completion.chunk", "choices": [],
                                         "usage": usage(res)})
                elif isinstance(up, Error):
                    finished = True
                    yield error(500, up.message, "turn_failed")
            if finished or diverged:
                break
        yield sse.frame("[DONE]")
    finally:
        if not finished:  # the client went away, the reply diverged, or the server is stopping: stop the turn
            spawn(cancel(svc, tid))


_background: set[asyncio.Task[None]] = set()


def spawn(coro: Any) -> None:
    """Run `coro` to its end even if the request that started it is being torn down."""
    task = asyncio.get_running_loop().create_task(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)
