"""/api: conversations that live in Redis, turns, and each turn's events over SSE."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Header, Query, Response
from starlette.concurrency import run_in_threadpool

from producer.api import sse
from producer.api.deps import Authed, Service
from producer.api.errors import ApiError, error_body
from producer.api.events import QueuedEvent, turn_events
from producer.api.schemas import (
    ConversationOut,
    CreateConversation,
    MessageOut,
    PostMessage,
    TurnCreated,
    TurnOut,
    usage,
)
from producer.api.service import ChatService, TurnView
from shared.errors import ChatError
from shared.messages import Role

router = APIRouter(prefix="/api", tags=["conversations"])
ROLE_NAMES = {Role.system: "system", Role.prompter: "user", Role.assistant: "assistant"}
_ENTRY_ID = re.compile(r"^\d{1,20}-\d{1,20}$")


@router.get("/models")
def list_models(svc: Service, caller: Authed) -> dict[str, Any]:
    """Preset models and those a worker has served, with their queue depth."""
    return {"models": svc.models()}


@router.post("/conversations", status_code=201)
def create_conversation(body: CreateConversation, svc: Service, caller: Authed) -> ConversationOut:
    svc.check_model(body.model)
    cid = svc.client.create_conversation(body.model, body.system, caller.id)
    return ConversationOut(id=cid, model=body.model, system=body.system)


@router.get("/conversations/{cid}")
def get_conversation(cid: str, svc: Service, caller: Authed) -> ConversationOut:
    conv = svc.conversation(caller.id, cid)
    return ConversationOut(id=conv.id, model=conv.model, system=conv.system, busy_turn=conv.busy)


@router.delete("/conversations/{cid}", status_code=204)
def delete_conversation(cid: str, svc: Service, caller: Authed) -> Response:
    conv = svc.conversation(caller.id, cid)
    if conv.busy:  # stop the turn in flight rather than let it answer into nothing
        try:
            svc.store.cancel(conv.busy)
        except ChatError:
            pass
    svc.store.delete(cid)
    return Response(status_code=204)


@router.get("/conversations/{cid}/messages")
def list_messages(cid: str, svc: Service, caller: Authed) -> dict[str, list[MessageOut]]:
    conv = svc.conversation(caller.id, cid)
    head = [MessageOut(role="system", content=conv.system)] if conv.system else []
    msgs = [MessageOut(role=ROLE_NAMES[m.role], content=m.text, turn_id=m.turn_id) for m in svc.store.messages(cid)]
    return {"messages": head + msgs}


@router.post("/conversations/{cid}/messages", status_code=202)
def post_message(cid: str, body: PostMessage, svc: Service, caller: Authed) -> TurnCreated:
    """Store the user message and enqueue the turn; answers at once with the turn id and queue position."""
    text = svc.store.check_text(body.content, "content")
    task, position = svc.send(caller.id, cid, text, body.sampling())
    base = f"/api/conversations/{cid}/turns/{task.turn_id}"
    return TurnCreated(
        turn_id=task.turn_id,
        conversation_id=cid,
        queue_position=position,
        events_url=f"{base}/events",
        turn_url=base,
    )


def turn_out(svc: ChatService, view: TurnView, model: str) -> TurnOut:
    st, f = view.state, view.fields
    out = TurnOut(
        id=st.id,
        conversation_id=st.conversation_id,
        status=st.status,
        attempt=st.attempt,
        worker=f.get("worker"),
        error=st.error,
        enqueued_at=st.enqueued_at or None,
        started_at=float(f["started_at"]) if "started_at" in f else None,
        finished_at=float(f["finished_at"]) if "finished_at" in f else None,
    )
    if st.status == "queued":
        out.queue_position = svc.queue_position(model, st.id)
    elif st.status == "running":
        out.reply = svc.partial_reply(st.id)
    elif st.result is not None:
        out.reply = st.result.text
        out.finish_reason = st.result.finish_reason.value
        out.usage = usage(st.result)
        out.timings = st.result.timings.model_dump()
    return out


@router.get("/conversations/{cid}/turns/{tid}")
def get_turn(cid: str, tid: str, svc: Service, caller: Authed) -> TurnOut:
    conv = svc.conversation(caller.id, cid)
    return turn_out(svc, svc.turn(caller.id, cid, tid), conv.model)


@router.post("/conversations/{cid}/turns/{tid}/cancel", status_code=202)
def cancel_turn(cid: str, tid: str, svc: Service, caller: Authed, response: Response) -> TurnOut:
    """Ask the worker to stop at its next step; the partial reply is kept (finish_reason cancelled)."""
    conv = svc.conversation(caller.id, cid)
    view = svc.turn(caller.id, cid, tid)
    if view.state.status in ("done", "failed"):
        response.status_code = 200  # nothing left to cancel
    else:
        svc.store.cancel(tid)
    return turn_out(svc, view, conv.model)


@router.get("/conversations/{cid}/turns/{tid}/events")
async def turn_event_stream(
    cid: str,
    tid: str,
    svc: Service,
    caller: Authed,
    last_event_id: str | None = Header(None),
    after: str | None = Query(None, description="resume after this stream entry id (like Last-Event-ID)"),
) -> Response:
    """SSE: queued {position}, start {attempt}, token {text}, done {reply, finish_reason, usage, ...},
    error {error}. Events from the turn's stream carry its entry id: reconnect with Last-Event-ID."""
    resume = last_event_id or after or "0-0"
    if not _ENTRY_ID.match(resume):
        raise ApiError(422, f"Last-Event-ID: not a stream entry id: {resume!r:.40}", param="Last-Event-ID")
    conv = await run_in_threadpool(svc.conversation, caller.id, cid)
    await run_in_threadpool(svc.turn, caller.id, cid, tid)
    ping_s = svc.settings.sse_ping_s

    async def body() -> AsyncIterator[str]:
        yield "retry: 1000\n\n"
        sent = time.monotonic()
        async for ev in turn_events(svc, tid, conv.model, resume):
            if ev is None:
                if time.monotonic() - sent >= ping_s:
                    sent = time.monotonic()
                    yield sse.PING
                continue
            sent = time.monotonic()
            if isinstance(ev, QueuedEvent):
                yield sse.frame({"position": ev.position}, "queued")
            elif ev.kind == "start":
                yield sse.frame({"attempt": ev.attempt}, "start", ev.id)
            elif ev.kind == "delta":
                yield sse.frame({"text": ev.text, "attempt": ev.attempt}, "token", ev.id)
            elif ev.kind == "done" and ev.result is not None:
                res = ev.result
                data = {
                    "turn_id": tid,
                    "reply": res.text,
                    "finish_reason": res.finish_reason.value,
                    "usage": usage(res).model_dump(),
                    "timings": res.timings.model_dump(),
                    "worker": res.worker,
                    "attempt": res.attempt,
                }
                yield sse.frame(data, "done", ev.id or None)
            else:
                yield sse.frame(error_body(500, ev.error or "the turn failed", code="turn_failed"), "error",
                                ev.id or None)

    return sse.response(body())
