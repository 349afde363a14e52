"""/api: conversations that live in Redis, turns, and each turn's events over SSE."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Header, Query, Response
from starlette.concurrency import run_in_threadpool

from producer.api import sse, tools
from producer.api.deps import Authed, Service
from producer.api.errors import ApiError, error_body, turn_failure
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
from producer.client import TurnRequest
from producer.reader import Append, Done, Error, EventKind, Queued, ReplyAssembler, Restart
from shared.messages import Role
from shared.wire import TurnStatus

router = APIRouter(prefix="/api", tags=["conversations"])
ROLE_NAMES = {Role.system: "system", Role.prompter: "user", Role.assistant: "assistant"}


@router.get("/models")
def list_models(svc: Service, caller: Authed) -> dict[str, Any]:
    """Preset models and those a worker has served, whether a live worker serves them now, their
    context length and queue depth."""
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
    """Delete it; a turn in flight is stopped, and nothing is written for the conversation afterwards."""
    svc.conversation(caller.id, cid)
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
    """Store the user message and queue the turn; answers at once with the turn id and queue position.
    Everything the model's worker would refuse for this request (top_k past the vocabulary, max_tokens
    past the context, a system prompt that leaves no room) is refused here first, with nothing stored."""
    turn = svc.start(TurnRequest(body.text, body.constrain(body.sampling()), conversation_id=cid, owner=caller.id,
                                 text_field="content", tools_prompt=body.tools_prompt(),
                                 grammar_field=body.grammar_field(body.grammar_param)))
    base = f"/api/conversations/{cid}/turns/{turn.turn_id}"
    return TurnCreated(
        turn_id=turn.turn_id,
        conversation_id=cid,
        queue_position=turn.position,
        dropped_messages=turn.dropped_messages,
        truncated_tokens=turn.truncated_tokens,
        events_url=f"{base}/events",
        turn_url=base,
    )


def turn_out(svc: ChatService, view: TurnView) -> TurnOut:
    st, f = view.state, view.fields
    out = TurnOut(
        id=st.id,
        conversation_id=st.conversation_id,
        status=st.status.value,
        attempt=st.attempt,
        worker=f.get("worker"),
        error=st.error,
        enqueued_at=st.enqueued_at or None,
        started_at=float(f["started_at"]) if "started_at" in f else None,
        finished_at=float(f["finished_at"]) if "finished_at" in f else None,
    )
    if st.status is TurnStatus.queued:
        out.queue_position = svc.client.queue_position(f["queue"], st.id) if "queue" in f else None
    elif st.status is TurnStatus.running:
        out.reply = svc.partial_reply(st.id)
    elif st.result is not None:
        out.reply = st.result.text
        out.tool_calls = tools.parse_reply(st.result.text, st.id).calls or None
        out.finish_reason = st.result.finish_reason.value
        out.usage = usage(st.result)
        out.dropped_messages = st.result.dropped_messages
        out.truncated_tokens = st.result.truncated_tokens
        out.timings = st.result.timings.model_dump()
    return out


@router.get("/conversations/{cid}/turns/{tid}")
def get_turn(cid: str, tid: str, svc: Service, caller: Authed) -> TurnOut:
    return turn_out(svc, svc.turn(caller.id, cid, tid))


@router.post("/conversations/{cid}/turns/{tid}/cancel", status_code=202)
def cancel_turn(cid: str, tid: str, svc: Service, caller: Authed, response: Response) -> TurnOut:
    """Stop the turn: a running one stops at its next step and keeps its partial reply (finish_reason
    cancelled); one no worker holds ends at once with an empty reply. 200 if it had ended already."""
    view = svc.turn(caller.id, cid, tid)
    if view.state.status.finished:
        response.status_code = 200  # nothing left to cancel
        return turn_out(svc, view)
    svc.store.cancel(tid)
    return turn_out(svc, svc.turn(caller.id, cid, tid))


@router.get("/conversations/{cid}/turns/{tid}/events")
async def turn_event_stream(
    cid: str,
    tid: str,
    svc: Service,
    caller: Authed,
    last_event_id: str | None = Header(None),
    after: str | None = Query(None, description="resume after this stream entry id (like Last-Event-ID)"),
) -> Response:
    """SSE: queued {position}, start {attempt, text}, token {text, attempt}, done {reply, finish_reason,
    usage, ...}, error {error}. `start` opens the reply, and comes again only if a worker was lost and the
    new attempt's reply differs from what was shown (then `text` replaces it). Events carry their stream
    entry id: reconnect with Last-Event-ID to go on where the connection dropped."""
    resume = last_event_id or after
    if resume is not None and sse.entry_id(resume) is None:
        param = "Last-Event-ID" if last_event_id else "after"
        raise ApiError(422, f"{param}: not a stream entry id: {resume!r:.40}", param=param)
    await run_in_threadpool(svc.turn, caller.id, cid, tid)
    return sse.response(_events(svc, tid, resume))


async def _events(svc: ChatService, tid: str, resume: str | None) -> AsyncIterator[str]:
    asm = ReplyAssembler()
    ping = sse.Pinger(svc.settings.sse_ping_s)
    until = sse.entry_id(resume) if resume else None  # replayed silently up to here, to rebuild the display
    retry: int | None = 1000
    started = resume is not None

    def out(data: Any, event: str, id: str | None = None) -> str:
        nonlocal retry
        text, retry = sse.frame(data, event, id, retry), None
        ping.sent_now()
        return text

    async for ev in svc.follow(tid):
        if svc.draining.is_set():
            yield out(error_body(503, "the server is restarting: reconnect with Last-Event-ID to go on",
                                 code="server_shutting_down"), "error")
            return
        if ev is None:
            if ping.due():
                yield sse.PING
            continue
        updates = asm.feed(ev)
        if until is not None and ev.id and (sse.entry_id(ev.id) or (0, 0)) <= until:
            # Replayed silently, up to the resume point; but a stream always ends with its final event,
            # even for a client that saw it already (else EventSource reconnects every second, forever).
            updates = [u for u in updates if isinstance(u, Done | Error)]
            if isinstance(next(iter(updates), None), Done):
                updates = [Done(updates[0].result, "")]
        if ev.kind is EventKind.start and not started:
            started = True
            yield out({"attempt": ev.attempt, "text": ""}, "start", ev.id)
        for up in updates:
            if isinstance(up, Queued):
                yield out({"position": up.position}, "queued")
            elif isinstance(up, Append):
                yield out({"text": up.text, "attempt": asm.attempt}, "token", ev.id)
            elif isinstance(up, Restart):
                yield out({"attempt": up.attempt, "text": up.text}, "start", ev.id)
            elif isinstance(up, Done):
                res = up.result
                data = {
                    "turn_id": tid,
                    "reply": res.text,
                    "tool_calls": tools.parse_reply(res.text, tid).calls or None,
                    "finish_reason": res.finish_reason.value,
                    "usage": usage(res).model_dump(),
                    "dropped_messages": res.dropped_messages,
                    "truncated_tokens": res.truncated_tokens,
                    "timings": res.timings.model_dump(),
                    "worker": res.worker,
                    "attempt": res.attempt,
                }
                if up.tail:
                    yield out({"text": up.tail, "attempt": asm.attempt}, "token", ev.id)
                yield out(data, "done", ev.id or None)
            elif isinstance(up, Error):
                status, message, code = turn_failure(up.message)
                yield out(error_body(status, message, code=code), "error", ev.id or None)

