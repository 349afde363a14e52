"""/v1: the OpenAI chat-completions API, so OpenAI clients and tools work unchanged.

A request is stateless: it becomes an internal conversation (system message, earlier messages
stored as they are), and its last user message is sent as the turn. `top_k` is accepted as an
extension. Finish reasons: end_key and stop -> "stop", length and cancelled (cut short) -> "length".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool

from producer.api import sse
from producer.api.deps import Authed, Service
from producer.api.errors import ApiError, error_body
from producer.api.events import QueuedEvent, turn_events
from producer.api.schemas import SamplingFields
from producer.api.service import ChatService
from shared.messages import ChatMessage, Role
from shared.wire import FinishReason, TurnResult

router = APIRouter(prefix="/v1", tags=["openai"])

FINISH = {
    FinishReason.end_key: "stop",
    FinishReason.stop: "stop",
    FinishReason.length: "length",
    FinishReason.cancelled: "length",
}
ROLES = {"system": Role.system, "developer": Role.system, "user": Role.prompter, "assistant": Role.assistant}


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str  # a string, or a list of {"type": "text", "text": ...} parts (joined)

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, v: object) -> str:
        if isinstance(v, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in v):
                raise ValueError("only text content parts are supported")
            v = "".join(p["text"] for p in v)
        if not isinstance(v, str):
            raise ValueError("must be a string or a list of text parts")
        if not v.strip():
            raise ValueError("must not be empty")
        return v


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields this server has no use for
    model: str = Field(min_length=1, max_length=100)
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def split(messages: list[Message]) -> tuple[str | None, list[ChatMessage], str]:
    """(system prompt, earlier messages, the last user message)."""
    sys_parts: list[str] = []
    i = 0
    while i < len(messages) and ROLES[messages[i].role] is Role.system:
        sys_parts.append(messages[i].content)
        i += 1
    rest = messages[i:]
    for j, m in enumerate(rest):
        if ROLES[m.role] is Role.system:
            raise ApiError(422, "a system message may only come first", param=f"messages[{i + j}].role")
    if not rest or rest[-1].role != "user":
        raise ApiError(422, "the last message must be a user message", param=f"messages[{len(messages) - 1}].role")
    history = [ChatMessage(role=ROLES[m.role], text=m.content) for m in rest[:-1]]
    return ("\n\n".join(sys_parts) or None), history, rest[-1].content


def start_turn(svc: ChatService, owner: str, req: ChatCompletionRequest) -> tuple[str, str]:
    """Create the internal conversation and enqueue the turn: (conversation id, turn id)."""
    svc.check_model(req.model)
    for k, m in enumerate(req.messages):
        svc.store.check_text(m.content, f"messages[{k}].content")
    system, history, last = split(req.messages)
    svc.admit(req.model)
    cid = svc.create_with_history(owner, req.model, system, history)
    task, _ = svc.send(owner, cid, last, req.sampling(req.max_completion_tokens))
    return cid, task.turn_id


def usage(res: TurnResult) -> dict[str, int]:
    return {
        "prompt_tokens": res.prompt_tokens,
        "completion_tokens": res.completion_tokens,
        "total_tokens": res.prompt_tokens + res.completion_tokens,
    }


@router.get("/models")
def list_models(svc: Service, caller: Authed) -> dict[str, Any]:
    data = [{"id": m["id"], "object": "model", "created": 0, "owned_by": "chat-worker-pool"} for m in svc.models()]
    return {"object": "list", "data": data}


@router.get("/models/{model}")
def get_model(model: str, svc: Service, caller: Authed) -> dict[str, Any]:
    svc.check_model(model)
    return {"id": model, "object": "model", "created": 0, "owned_by": "chat-worker-pool"}


@router.post("/chat/completions")
async def chat_completions(req: ChatCompletionRequest, svc: Service, caller: Authed) -> Response:
    cid, tid = await run_in_threadpool(start_turn, svc, caller.id, req)
    base = {"id": f"chatcmpl-{tid}", "created": int(time.time()), "model": req.model}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return sse.response(stream(svc, tid, req.model, base, include_usage))
    try:
        res = await asyncio.wait_for(wait(svc, tid, req.model), svc.settings.completion_timeout_s)
    except TimeoutError:
        await run_in_threadpool(svc.store.cancel, tid)
        raise ApiError(504, f"no reply within {svc.settings.completion_timeout_s:g}s; the turn was cancelled") from None
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


async def wait(svc: ChatService, tid: str, model: str) -> TurnResult:
    async for ev in turn_events(svc, tid, model):
        if ev is None or isinstance(ev, QueuedEvent):
            continue
        if ev.kind == "done" and ev.result is not None:
            return ev.result
        if ev.kind == "error":
            raise ApiError(500, ev.error or "the turn failed", code="turn_failed")
    raise ApiError(500, "the turn's stream ended without a result", code="turn_failed")


async def stream(
    svc: ChatService, tid: str, model: str, base: dict[str, Any], include_usage: bool
) -> AsyncIterator[str]:
    """chat.completion.chunk events, then `data: [DONE]`. If a worker is replaced mid-turn the new
    attempt's text is checked against what was already sent and only what is new goes out."""

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return sse.frame({**base, "object": "chat.completion.chunk", "choices": [choice], **extra})

    yield chunk({"role": "assistant", "content": ""})
    sent, current = "", ""
    finished = False
    try:
        async for ev in turn_events(svc, tid, model):
            if ev is None:
                yield sse.PING
                continue
            if isinstance(ev, QueuedEvent):
                continue
            if ev.kind == "start":
                current = ""
            elif ev.kind == "delta":
                current += ev.text
                if not (current.startswith(sent) or sent.startswith(current)):
                    finished = True
                    yield sse.frame(error_body(500, "the turn was restarted on another worker and diverged"))
                    break
                if len(current) > len(sent):
                    yield chunk({"content": current[len(sent) :]})
                    sent = current
            elif ev.kind == "done" and ev.result is not None:
                res = ev.result
                if len(res.text) > len(sent) and res.text.startswith(sent):
                    yield chunk({"content": res.text[len(sent) :]})
                yield chunk({}, FINISH[res.finish_reason], system_fingerprint=res.worker or None)
                if include_usage:
                    yield sse.frame({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage(res)})
                finished = True
                break
            else:
                finished = True
                yield sse.frame(error_body(500, ev.error or "the turn failed", code="turn_failed"))
                break
        yield sse.frame("[DONE]")
    finally:
        if not finished:  # the client went away: stop generating for nobody (sync: we may be cancelled)
            svc.store.cancel(tid)
