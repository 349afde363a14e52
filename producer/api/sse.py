"""Server-sent events: framing, keep-alive pings, and the response that carries them."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}
PING = ": ping\n\n"
_ENTRY_ID_MAX = 2**64 - 1  # Redis stream ids are two unsigned 64-bit numbers: ms-seq


def frame(data: Any, event: str | None = None, id: str | None = None, retry_ms: int | None = None) -> str:
    """One event. An id is only set on events that come from the turn's Redis stream, so a reconnect's
    Last-Event-ID always names a stream entry. `retry_ms` rides on a real event, never alone (a bare
    `retry:` block reads as an empty event in some clients)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    out = f"retry: {retry_ms}\n" if retry_ms is not None else ""
    if id:
        out += f"id: {id}\n"
    if event:
        out += f"event: {event}\n"
    for line in text.split("\n"):
        out += f"data: {line}\n"
    return out + "\n"


def entry_id(value: str) -> tuple[int, int] | None:
    """A Redis stream entry id `ms-seq` as numbers, or None if it is not one Redis would accept."""
    ms, sep, seq = value.partition("-")
    if not sep or not ms.isdigit() or not seq.isdigit() or len(ms) > 20 or len(seq) > 20:
        return None
    a, b = int(ms), int(seq)
    return (a, b) if a <= _ENTRY_ID_MAX and b <= _ENTRY_ID_MAX else None


class Pinger:
    """A comment line when nothing else went out for `every_s` seconds (keeps proxies from closing)."""

    def __init__(self, every_s: float):
        self.every_s = every_s
        self.sent = time.monotonic()

    def sent_now(self) -> None:
        self.sent = time.monotonic()

    def due(self) -> bool:
        if time.monotonic() - self.sent >= self.every_s:
            self.sent = time.monotonic()
            return True
        return False


def response(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers=HEADERS)
