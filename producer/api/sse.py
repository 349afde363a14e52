"""Server-sent events: framing, and the response that carries them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}


def frame(data: Any, event: str | None = None, id: str | None = None) -> str:
    """One event. An id is only set on events that come from the turn's Redis stream, so a
    reconnect's Last-Event-ID always names a stream entry."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    out = ""
    if id:
        out += f"id: {id}\n"
    if event:
        out += f"event: {event}\n"
    for line in text.split("\n"):
        out += f"data: {line}\n"
    return out + "\n"


PING = ": ping\n\n"


def response(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers=HEADERS)
