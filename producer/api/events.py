"""A turn's events, read from its Redis stream without blocking the event loop.

queued (position, while the turn waits: 1 = next), start (an attempt begins: discard what was shown),
delta (text), done (the TurnResult) or error (the reason); done and error end it. `after` resumes
after a stream entry id (SSE's Last-Event-ID). None is yielded after each idle second, so a
consumer can send keep-alives.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from producer.api.service import ChatService
from producer.client import TERMINAL, StreamEvent, stream_events
from shared.wire import TurnResult

BLOCK_MS = 1000


@dataclass
class QueuedEvent:
    position: int


async def turn_events(
    svc: ChatService, turn_id: str, model: str, after: str = "0-0"
) -> AsyncIterator[StreamEvent | QueuedEvent | None]:
    ar = svc.ar
    key, tkey = svc.keys.stream(turn_id), svc.keys.turn(turn_id)
    last = after or "0-0"
    position: int | None = None
    while True:
        status, result, error, attempt = await ar.hmget(tkey, "status", "result", "error", "attempt")
        st = status.decode() if status else None
        if st is None:
            yield StreamEvent("", "error", 0, error=f"turn {turn_id!r} not found (expired or deleted)")
            return
        if st == "queued":
            pos = await svc.aqueue_position(model, turn_id)
            if pos != position:
                position = pos
                yield QueuedEvent(pos)
        # Blocking only while the turn can still write: a finished turn's stream is read without waiting.
        finished = st in ("done", "failed")
        resp = await ar.xread({key: last}, block=None if finished else BLOCK_MS, count=256)
        for ev in stream_events(resp):
            last = ev.id
            yield ev
            if ev.kind in TERMINAL:
                return
        if not resp and not finished:
            yield None
        if finished and not resp:  # the stream expired, or its end was read before a reconnect
            n = int(attempt or 0)
            if st == "done" and result:
                yield StreamEvent("", "done", n, result=TurnResult.model_validate_json(result))
            else:
                yield StreamEvent("", "error", n, error=(error or b"the turn failed").decode())
            return
