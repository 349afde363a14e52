"""/v1/responses: a subset of OpenAI's Responses API, mapped onto the conversation store.

A response is a turn: its id is `resp_<turn id>`. `previous_response_id` continues the conversation that response
belongs to, so a chain of responses is one stored conversation whose KV stays on the worker that served it
(cache-aware routing): each request sends only its new message, never the history. Continuing from a response that
is not its conversation's latest forks: a new conversation holding the history up to that response. Supported:
`input` as a string or messages (text parts; with `previous_response_id`, one user message), `instructions` (the
system prompt of a new chain; a continued one keeps its own), `max_output_tokens`, the chat route's sampling fields,
`text.format` (text, json_object, json_schema: structured outputs), `store`, `truncation` (`auto` drops the oldest
turns to fit, `disabled` refuses what does not fit), `stream` (the Responses event sequence) and
`GET /v1/responses/{id}`. Tools, files, images and reasoning are a 400 naming the field.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from starlette.concurrency import run_in_threadpool

from producer.api import sse, tools
from producer.api.deps import Authed, Service
from producer.api.errors import ApiError, from_chat_error
from producer.api.routes_openai import Piece, reply_events, wait_for_reply
from producer.api.schemas import JsonSchemaFormat, ResponseFormat, SamplingFields, refused
from producer.api.service import ChatService
from producer.client import TurnRequest
from shared.errors import ChatError, InvalidInput, NotFound, first_error
from shared.messages import ChatMessage, Role
from shared.sampling import MaxTokens
from shared.wire import FinishReason, TurnResult, TurnStatus

router = APIRouter(prefix="/v1", tags=["openai"])
STRICT = ConfigDict(strict=True, extra="forbid")
ROLES = {"user": Role.prompter, "assistant": Role.assistant, "system": Role.system, "developer": Role.system}


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")  # annotations, logprobs of earlier outputs
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")  # id, status of an earlier output item
    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class TextFormat(BaseModel):
    """`text.format`: OpenAI's Responses shape of response_format (json_schema's fields sit beside `type`)."""

    model_config = STRICT
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_only_for_json_schema(self) -> TextFormat:
        if self.type != "json_schema" and (self.schema_ is not None or self.name is not None):
            raise ValueError(f"name and schema belong to type json_schema, not {self.type}")
        return self

    def response_format(self) -> ResponseFormat:
        if self.type != "json_schema":
            return ResponseFormat(type=self.type)
        return ResponseFormat(type="json_schema", json_schema=JsonSchemaFormat.model_validate(
            {"name": self.name or "response", "description": self.description, "schema": self.schema_,
             "strict": self.strict}))


class TextOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")  # verbosity
    format: TextFormat | None = None


class ResponseRequest(SamplingFields):
    model_config = ConfigDict(strict=True, extra="ignore")  # metadata, user, service_tier, ... change nothing
    model: str = Field(min_length=1, max_length=100)
    input: str | list[InputMessage]
    instructions: str | None = None
    previous_response_id: str | None = Field(None, max_length=100)
    max_output_tokens: MaxTokens | None = None
    stream: bool | None = False
    store: bool | None = True
    text: TextOptions | None = None
    truncation: Literal["auto", "disabled"] | None = "disabled"
    # Not supported yet: a non-empty value is a 400 naming it.
    tools: list[Any] | None = None
    tool_choice: Any = None
    reasoning: dict[str, Any] | None = None
    include: list[Any] | None = None
    background: bool | None = None
    top_logprobs: int | None = None
    n: int | None = Field(None, ge=1, le=1)

    _no_background = refused("background", why="background responses are not supported: stream, or wait for "
                             "the answer")
    _no_logprobs = refused("top_logprobs", why="not supported on /v1/responses yet (logprobs: use "
                           "/v1/chat/completions)")
    _no_tools = refused("tools", "include", "tool_choice", allowed=("none", "auto"),
                        why="not supported on /v1/responses yet (tools: use /v1/chat/completions)")

    @field_validator("max_output_tokens")
    @classmethod
    def _one_length(cls, v: int | None, info: ValidationInfo) -> int | None:
        given = info.data.get("max_tokens")  # SamplingFields', validated before
        if v is not None and given is not None and v != given:
            raise ValueError(f"differs from max_tokens ({given}): give max_output_tokens only")
        return v

    @model_validator(mode="after")
    def _one_format(self) -> ResponseRequest:
        fmt = self.text.format if self.text is not None else None
        if fmt is not None and fmt.type != "text" and (
                self.grammar is not None or (self.response_format is not None and self.response_format.type != "text")):
            raise ValueError("text: give the reply's format in text.format only (not also response_format or "
                             "grammar)")
        msgs = self.messages()
        for i, m in enumerate(msgs):
            if m.role in ("system", "developer") and any(x.role not in ("system", "developer") for x in msgs[:i]):
                raise ValueError(f"input: [{i}] a system or developer message may only come before the others")
        return self

    @field_validator("input")
    @classmethod
    def _some_input(cls, v: str | list[InputMessage]) -> str | list[InputMessage]:
        if not v:
            raise ValueError("must not be empty")
        if isinstance(v, list) and v[-1].role != "user":
            raise ValueError(f"[{len(v) - 1}]: the last input message must be from the user")
        return v

    @field_validator("text")
    @classmethod
    def _valid_format(cls, v: TextOptions | None) -> TextOptions | None:
        if v is not None and v.format is not None:
            try:
                v.format.response_format().grammar()
            except (ValueError, ValidationError) as e:
                why = first_error(e).msg if isinstance(e, ValidationError) else str(e)
                raise ValueError(f"format: {why}") from None
        return v

    @field_validator("reasoning")
    @classmethod
    def _no_reasoning(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v and any(x is not None for x in v.values()):
            raise ValueError("these models do not reason")
        return v

    def messages(self) -> list[InputMessage]:
        return [InputMessage(role="user", content=self.input)] if isinstance(self.input, str) else self.input


def turn_of(response_id: str) -> str:
    """The turn id behind a response id. Raises NotFound (param previous_response_id) for anything else."""
    if not response_id.startswith("resp_"):
        raise NotFound(f"previous_response_id: no response {response_id[:100]!r}", "previous_response_id")
    return response_id.removeprefix("resp_")


def body(res: TurnResult | None, tid: str, model: str, created: float, status: str, previous: str | None,
         instructions: str | None) -> dict[str, Any]:
    """The Response object (OpenAI's shape) of a turn; `res` None while it runs or when it failed."""
    incomplete = None
    output: list[dict[str, Any]] = []
    usage = None
    if res is not None:
        if res.finish_reason in (FinishReason.length, FinishReason.cancelled):
            status = "incomplete"
            incomplete = {"reason": "max_output_tokens" if res.finish_reason is FinishReason.length else "cancelled"}
        output = [{"type": "message", "id": f"msg_{tid}", "status": "completed", "role": "assistant",
                   "content": [{"type": "output_text", "text": res.text, "annotations": []}]}]
        usage = {"input_tokens": res.prompt_tokens, "output_tokens": res.completion_tokens,
                 "total_tokens": res.prompt_tokens + res.completion_tokens,
                 "input_tokens_details": {"cached_tokens": res.cached_tokens},
                 "output_tokens_details": {"reasoning_tokens": 0}}
    return {"id": f"resp_{tid}", "object": "response", "created_at": int(created), "status": status,
            "model": model, "output": output, "incomplete_details": incomplete, "error": None,
            "previous_response_id": previous, "instructions": instructions, "usage": usage,
            "parallel_tool_calls": False, "tool_choice": "auto", "tools": [], "metadata": {}}


def _history_until(svc: ChatService, cid: str, tid: str) -> list[ChatMessage]:
    """The conversation's messages up to the reply of turn `tid` (a fork point)."""
    msgs = svc.store.messages(cid)
    for i, m in enumerate(msgs):
        if m.role is Role.assistant and m.turn_id == tid:
            return msgs[: i + 1]
    raise NotFound(f"previous_response_id: response resp_{tid} has no stored reply", "previous_response_id")


def _turn_request(svc: ChatService, req: ResponseRequest, owner: str) -> TurnRequest:
    """The turn this request starts: in the previous response's conversation (or a fork of it), or a new one."""
    sampling = req.sampling(req.max_output_tokens or req.max_tokens)
    if req.text is not None and req.text.format is not None and (g := req.text.format.response_format().grammar()):
        sampling = sampling.model_copy(update={"grammar": g})
    msgs = req.messages()
    ttl = svc.settings.responses_ttl_s if req.store else svc.settings.openai_conversation_ttl_s
    field = "text" if req.text is not None and req.text.format is not None and req.text.format.type != "text" \
        else req.grammar_param
    common = {"owner": owner, "ttl_s": ttl, "truncate": req.truncation == "auto", "text_field": "input",
              "grammar_field": field}
    if req.previous_response_id is None:
        system = "\n\n".join(p for p in [req.instructions or "", *(m.text for m in msgs if m.role in (
            "system", "developer"))] if p) or None
        history = tuple(ChatMessage(role=ROLES[m.role], text=m.text) for m in msgs[:-1]
                        if m.role not in ("system", "developer"))
        return TurnRequest(msgs[-1].text, sampling, model=req.model, system=system, history=history, **common)
    if len(msgs) != 1:
        raise ApiError(400, "input: with previous_response_id, send the one new user message",
                       param="input")
    tid = turn_of(req.previous_response_id)
    try:
        state = svc.store.turn(tid)
        conv = svc.conversation(owner, state.conversation_id)  # another caller's is not found
    except (NotFound, InvalidInput):
        raise NotFound(f"previous_response_id: no response {req.previous_response_id!r}",
                       "previous_response_id") from None
    if state.status is not TurnStatus.done:
        raise ApiError(400, f"previous_response_id: response resp_{tid} has not completed ({state.status.value})",
                       param="previous_response_id")
    if conv.model != req.model:
        raise ApiError(400, f"model: response resp_{tid} was made by {conv.model!r}; continue with that model",
                       param="model")
    if req.instructions is not None and req.instructions != (conv.system or ""):
        raise ApiError(400, "instructions: a continued response keeps its conversation's instructions; leave them "
                       "out or send the same", param="instructions")
    if conv.turn == tid:  # the conversation's latest: continue it (its KV is on the worker that served it)
        return TurnRequest(msgs[0].text, sampling, conversation_id=conv.id, **common)
    return TurnRequest(msgs[0].text, sampling, model=conv.model, system=conv.system,
                       history=tuple(_history_until(svc, conv.id, tid)), **common)


@router.post("/responses")
async def create_response(req: ResponseRequest, request: Request, svc: Service, caller: Authed) -> Response:
    def start() -> Any:
        svc.check_model(req.model)
        return svc.start(_turn_request(svc, req, caller.id))

    try:
        turn = await run_in_threadpool(start)
    except ChatError as e:
        raise from_chat_error(e, openai=True, names={"max_tokens": "max_output_tokens"}) from None
    created = time.time()
    if req.stream:
        return sse.response(stream(svc, turn.turn_id, req, created))
    res = await wait_for_reply(svc, request, turn.turn_id)
    if res is None:
        return Response(status_code=499)
    return JSONResponse(body(res, turn.turn_id, req.model, created, "completed", req.previous_response_id,
                             req.instructions))


@router.get("/responses/{response_id}")
def get_response(response_id: str, svc: Service, caller: Authed) -> dict[str, Any]:
    """A stored response: completed, incomplete, failed, or still queued / in progress (without output)."""
    try:
        tid = turn_of(response_id)
        state = svc.store.turn(tid)
        conv = svc.conversation(caller.id, state.conversation_id)
    except (NotFound, InvalidInput):
        raise ApiError(404, f"no response {response_id[:100]!r}", param="response_id") from None
    status = {TurnStatus.queued: "queued", TurnStatus.running: "in_progress", TurnStatus.done: "completed",
              TurnStatus.failed: "failed"}[state.status]
    out = body(state.result, tid, conv.model, state.enqueued_at, status, _previous(svc, conv.id, tid), conv.system)
    if state.status is TurnStatus.failed:
        out["error"] = {"code": "server_error", "message": state.error or "the turn failed"}
    return out


def _previous(svc: ChatService, cid: str, tid: str) -> str | None:
    """The response a stored one continued: the conversation's reply before turn `tid`'s (a fork keeps the replies
    it was forked with, ids included); None for the first of a chain, or while `tid` has no reply yet."""
    msgs = svc.store.messages(cid)
    mine = next((i for i, m in enumerate(msgs) if m.role is Role.assistant and m.turn_id == tid), None)
    if mine is None:
        return None
    before = [m for m in msgs[:mine] if m.role is Role.assistant and m.turn_id]
    return f"resp_{before[-1].turn_id}" if before else None


async def stream(svc: ChatService, tid: str, req: ResponseRequest, created: float) -> AsyncIterator[str]:
    """The Responses event sequence: created, in_progress, output_item.added, content_part.added, output_text.delta
    per piece, output_text.done, content_part.done, output_item.done, completed (or incomplete), each with its
    `sequence_number`; an error frame and `[DONE]` as the chat stream ends."""
    seq = 0
    msg_id = f"msg_{tid}"

    def event(kind: str, **fields: Any) -> str:
        nonlocal seq
        seq += 1
        return sse.frame({"type": kind, "sequence_number": seq, **fields}, event=kind)

    shell = body(None, tid, req.model, created, "in_progress", req.previous_response_id, req.instructions)
    yield event("response.created", response=shell)
    yield event("response.in_progress", response=shell)
    item = {"type": "message", "id": msg_id, "status": "in_progress", "role": "assistant", "content": []}
    yield event("response.output_item.added", output_index=0, item=item)
    part = {"type": "output_text", "text": "", "annotations": []}
    yield event("response.content_part.added", item_id=msg_id, output_index=0, content_index=0, part=part)
    async for ev in reply_events(svc, tid, tools.ReplyShaper(tid)):
        if isinstance(ev, str):
            if ev.startswith("data: [DONE]"):
                continue  # the Responses stream ends with its completed event
            yield ev
        elif isinstance(ev, Piece):
            yield event("response.output_text.delta", item_id=msg_id, output_index=0, content_index=0,
                        delta=ev.delta.get("content", ""))
        else:
            res = ev.result
            yield event("response.output_text.done", item_id=msg_id, output_index=0, content_index=0, text=res.text)
            yield event("response.content_part.done", item_id=msg_id, output_index=0, content_index=0,
                        part={**part, "text": res.text})
            done = body(res, tid, req.model, created, "completed", req.previous_response_id, req.instructions)
            yield event("response.output_item.done", output_index=0, item=done["output"][0])
            yield event("response.completed" if done["status"] == "completed" else "response.incomplete",
                        response=done)
