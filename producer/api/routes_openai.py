"""/v1: the OpenAI chat-completions API, so OpenAI clients and tools work unchanged.

A request is stateless: it becomes an internal conversation (system message, earlier messages), and
its last user message is sent as the turn. Like OpenAI, a conversation that does not fit the model's
context is refused (400 `context_length_exceeded`, with the numbers) unless the request opts in to
dropping its oldest turns with the extension field `truncate: true` (as TGI's `truncate`); the
response then says how many messages were left out (`usage.dropped_messages`). Penalties, logit_bias and
`response_format` (structured outputs, enforced by constrained decoding) are OpenAI's; `top_k`,
`repetition_penalty` and `grammar` (TGI's) are accepted as extensions; tools and tool_choice are rendered and
enforced by tools.py. Fields that would change the answer's shape
or sampling and that this server does not implement yet are a 400 naming the field, never ignored.
Finish reasons: end_key and stop -> "stop", length and cancelled (cut short) -> "length".

The client's connection is followed: a client that goes away (streaming or not) has its turn
cancelled within about a second.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from starlette.concurrency import run_in_threadpool

from producer.api import sse, tools
from producer.api.deps import Authed, Service
from producer.api.errors import ApiError, error_body, from_chat_error, turn_failure
from producer.api.schemas import SamplingFields, refused
from producer.api.service import ChatService
from producer.api.tools import MAX_TOOLS, ToolCall
from producer.client import StartedTurn, TurnRequest
from producer.reader import Append, Done, Error, ReplyAssembler, Restart
from shared.errors import ChatError, first_error
from shared.messages import ChatMessage, Role, check_text, is_blank
from shared.sampling import MaxTokens, TopLogprobs
from shared.wire import FinishReason, TurnResult

router = APIRouter(prefix="/v1", tags=["openai"])

FINISH = {
    FinishReason.end_key: "stop",
    FinishReason.stop: "stop",
    FinishReason.length: "length",
    FinishReason.cancelled: "length",
}
ROLES = {"system": Role.system, "developer": Role.system, "user": Role.prompter, "assistant": Role.assistant,
         "tool": Role.prompter}  # a tool's result is shown to the model in a user turn (tools.py)
STRICT = ConfigDict(strict=True, extra="forbid")


MAX_MESSAGES = 4096  # more can never fit a context (every message costs at least one token of markup)


class Message(BaseModel):
    """One message as OpenAI clients send it. `content` is a string, null, or a list of text parts (joined);
    it may be null or empty on an assistant message (a reply this product produced can be empty, and a tool call's
    message has none). Tool loops: an assistant message's `tool_calls`, and `role: tool` messages with the result
    (tools.py renders both)."""

    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | None = None
    name: str | None = None  # accepted, not used
    tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_TOOLS)
    tool_call_id: str | None = Field(None, max_length=100)
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
    def _roles(self) -> Message:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls: only an assistant message makes tool calls")
        if self.role == "tool" and (self.tool_call_id is None or self.content is None):
            raise ValueError("a tool message needs tool_call_id and content")
        return self

    @property
    def text(self) -> str:
        """What the model sees of it: the content, with an assistant's tool calls or a tool's result (tools.py)."""
        if self.tool_calls:
            return tools.call_text(self.tool_calls, self.content)
        if self.role == "tool":
            return tools.response_text(self.content or "")
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool | None = False  # null = false, as OpenAI reads it


class ChatCompletionRequest(SamplingFields, tools.ToolFields):
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
    functions: list[Any] | None = None
    function_call: Any = None
    logprobs: bool | None = None  # each reply token's log probability (choices[].logprobs.content)
    top_logprobs: TopLogprobs | None = None  # and this many alternatives per token (needs logprobs: true)
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

    _no_functions = refused("functions", why="the deprecated functions are not supported: send them as tools")
    _no_function_call = refused("function_call", allowed=("none", "auto"),
                                why="the deprecated function_call is not supported: use tool_choice")


    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("needs logprobs: true")
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
    if not rest or rest[-1].role not in ("user", "tool"):
        raise ApiError(422, f"messages[{last}].role: the last message must be a user message (or a tool result)",
                       param=f"messages[{last}].role")
    # The results of one round of tool calls (consecutive tool messages) are one user turn, as the prompt shows them.
    turns: list[tuple[int, Role, str]] = []
    for j, m in enumerate(rest):
        if m.role == "tool" and j and rest[j - 1].role == "tool":
            k, role, text = turns[-1]
            turns[-1] = (k, role, text + "\n" + m.text)
        else:
            turns.append((i + j, ROLES[m.role], m.text))
    history = []
    for k, role, text in turns[:-1]:
        try:
            history.append(ChatMessage(role=role, text=text))
        except ValidationError as e:
            why = first_error(e).msg.removeprefix("text: ")
            raise ApiError(422, f"messages[{k}].content: {why}", param=f"messages[{k}].content") from None
    for k, part in enumerate(sys_parts):
        field = f"messages[{k}].content"
        if is_blank(part):
            raise ApiError(422, f"{field}: a system message must not be empty", param=field)
        try:
            check_text(part, field=field)
        except ValueError as e:
            raise ApiError(422, str(e), param=field) from None
    return ("\n\n".join(sys_parts) or None), history, turns[-1][2], turns[-1][0]


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


def logprobs(res: TurnResult) -> dict[str, Any] | None:
    """OpenAI's `choices[].logprobs`: one entry per reply token (`bytes`: the UTF-8 of the token's text, decoded
    alone), or None when the request did not ask."""
    if res.logprobs is None:
        return None

    def entry(token: str, lp: float) -> dict[str, Any]:
        return {"token": token, "logprob": lp, "bytes": list(token.encode("utf-8", "surrogatepass"))}

    return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(a, v) for a, v in t.top]}
                        for t in res.logprobs], "refusal": None}


# What every served model supports: the engine does it all on the host, whatever the backend (CPU, CUDA, IPU).
CAPABILITIES = {"chat_completions": True, "completions": True, "responses": True, "structured_outputs": True,
                "tools": True, "tool_choice": ["none", "auto", "required", "named"], "logprobs": True,
                "max_top_logprobs": 20}


def model_entry(m: dict[str, Any]) -> dict[str, Any]:
    """A /v1/models entry: OpenAI's fields, the context length (positions for prompt and reply together), the
    live workers serving it and what it supports."""
    return {"id": m["id"], "object": "model", "created": 0, "owned_by": "chat-worker-pool",
            "context_length": m["context_length"], "workers": m["workers"], "capabilities": CAPABILITIES}


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
    if req.logprobs:
        sampling = sampling.model_copy(update={"logprobs": req.top_logprobs or 0})
    sampling = req.constrain(sampling)  # a required or named call is a grammar
    shown = req.tools_shown

    def start() -> StartedTurn:  # one hop to the thread pool for both (each hop is a wake-up under load)
        svc.check_model(req.model)
        return svc.start(TurnRequest(
            last, sampling, model=req.model, system=system, history=tuple(history), owner=caller.id,
            ttl_s=svc.settings.openai_conversation_ttl_s, truncate=bool(req.truncate),
            text_field=f"messages[{index}].content", tools_prompt=req.tools_prompt(),
            grammar_field=req.grammar_field(req.grammar_param)))

    try:
        turn = await run_in_threadpool(start)
    except ChatError as e:  # named as this request named it
        names = {"max_tokens": "max_completion_tokens"} if req.max_completion_tokens is not None else {}
        raise from_chat_error(e, openai=True, names=names) from None
    tid = turn.turn_id
    base = {"id": f"chatcmpl-{tid}", "created": int(time.time()), "model": req.model}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        shaper = tools.ReplyShaper(tid, shown, req.forced_call)
        return sse.response(stream(svc, tid, base, include_usage, shaper))
    res = await wait_for_reply(svc, request, tid)
    if res is None:  # the client left; its turn was cancelled
        return Response(status_code=499)
    message: dict[str, Any] = {"role": "assistant", "content": res.text}
    finish = FINISH[res.finish_reason]
    if shown:
        parsed = tools.parse_reply(res.text, tid, shown, req.forced_call)
        if parsed.calls:
            message = {"role": "assistant", "content": parsed.content, "tool_calls": parsed.calls}
            finish = "tool_calls" if finish == "stop" else finish
    return JSONResponse(
        {
            **base,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": finish,
                    "logprobs": logprobs(res),
                }
            ],
            "usage": usage(res),
            "system_fingerprint": res.worker or None,
        }
    )


async def _outcome(svc: ChatService, tid: str) -> TurnResult:
    async for ev in svc.follow(tid):
        if ev is None:
            continue
        if ev.kind == "done" and ev.result is not None:
            return ev.result
        if ev.kind == "error":
            raise ApiError(*turn_failure(ev.error or "the turn failed"))
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


@dataclass
class Piece:
    """A part of a streamed reply, shaped (tools.ReplyShaper): a `delta` as chat.completion.chunk carries it."""

    delta: dict[str, Any]


@dataclass
class End:
    """The reply's end: the finish_reason to send and the turn's result."""

    finish: str
    result: TurnResult


async def reply_events(svc: ChatService, tid: str, shaper: tools.ReplyShaper) -> AsyncIterator[Piece | End | str]:
    """A turn's reply as it streams: Pieces, then its End; a `str` is an SSE frame to send as it is (a ping, an
    error, the final `data: [DONE]`). If a worker is lost mid-turn, the new attempt continues the text seamlessly
    while it agrees with what was sent; if it diverges, the stream ends with an error (text already sent cannot be
    taken back). A turn that did not end (the client left, it diverged, the server is stopping) is cancelled."""

    def error(status: int, message: str, code: str) -> str:
        return sse.frame(error_body(status, message, code=code))

    ping = sse.Pinger(svc.settings.sse_ping_s)
    asm = ReplyAssembler()
    finished = False  # the turn ended (done or error) and the client was told
    drain_end: float | None = None
    try:
        async for ev in svc.follow(tid):
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
                    for delta in shaper.feed(up.text):
                        yield Piece(delta)
                elif isinstance(up, Restart):
                    diverged = True
                    yield error(500, "the turn was restarted on another worker and its reply diverged from what "
                                "was already sent; send the request again", "diverged")
                    break
                elif isinstance(up, Done):
                    finished = True
                    deltas = shaper.feed(up.tail) if up.tail else []
                    last, finish = shaper.finish(FINISH[up.result.finish_reason])
                    for delta in deltas + last:
                        yield Piece(delta)
                    yield End(finish, up.result)
                elif isinstance(up, Error):
                    finished = True
                    status, message, code = turn_failure(up.message)
                    yield error(status, message, code)
            if finished or diverged:
                break
        yield sse.frame("[DONE]")
    finally:
        if not finished:
            spawn(cancel(svc, tid))


async def stream(
    svc: ChatService, tid: str, base: dict[str, Any], include_usage: bool, shaper: tools.ReplyShaper
) -> AsyncIterator[str]:
    """chat.completion.chunk events (reply_events), then `data: [DONE]`."""

    def chunk(delta: dict[str, Any], finish: str | None = None, lp: dict[str, Any] | None = None, **extra: Any) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": lp}
        return sse.frame({**base, "object": "chat.completion.chunk", "choices": [choice], **extra})

    yield chunk({"role": "assistant", "content": ""})
    async for item in reply_events(svc, tid, shaper):
        if isinstance(item, str):
            yield item
        elif isinstance(item, Piece):
            yield chunk(item.delta)
        else:
            res = item.result
            if res.logprobs is not None:  # all of them, in one chunk before the finish (see the docs)
                yield chunk({}, lp=logprobs(res))
            yield chunk({}, item.finish, system_fingerprint=res.worker or None)
            if include_usage:
                yield sse.frame({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage(res)})


_background: set[asyncio.Task[None]] = set()


def spawn(coro: Any) -> None:
    """Run `coro` to its end even if the request that started it is being torn down."""
    task = asyncio.get_running_loop().create_task(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)
