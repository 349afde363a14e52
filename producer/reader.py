"""Reading a turn as it happens: one reader, one reply assembler, for every consumer (the CLI, the
client library, the /api SSE stream and the /v1 stream).

TurnReader is the reading logic without I/O: it says what to read next (the turn's record, its
stream from the last entry seen) and turns what was read into StreamEvents. `follow` (redis-py) and
`afollow` (redis.asyncio) drive it. A reader resumes after any stream entry id (SSE's Last-Event-ID),
rides out dropped connections (the clients retry, see config/redis_clients.py), blocks only while the
turn can still write, and falls back to the turn's record when the stream has expired.

A turn's end (done, failed, or no such turn) is reported only as the primary holds it once its replicas
do (given a Replication that waits for replicas, CHAT_REDIS_WAIT_REPLICAS): what a reader reads on the
primary may not have reached a replica yet, and a failover then takes it back (a failure taken back is
followed by the turn's re-run and its reply: a client told "failed" would see it answered). So an end
is held, CONFIRM reads the record on the primary and writes behind it, the WAIT after it returns once
the replicas hold that write and so everything before it, and the end is reported from that record; if
the primary holds no such end (taken back, or read from a node behind it) the turn is followed on.

ReplyAssembler turns events into what a display that cannot take text back shows. A turn whose
worker was lost is generated again from the start by another worker (a new attempt, announced by a
`start` event): while the new attempt's text agrees with what was shown it only extends it; if it
diverges, the consumer is told to restart its display (or, where it cannot, to end with an error).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

import redis
import redis.asyncio as aredis

from shared.keys import Keys
from shared.replication import Replication
from shared.wire import TurnResult, TurnStatus

BLOCK_MS = 1000  # one XREAD waits at most this long: the reader looks at the turn's record in between
RECORD_EVERY_S = 1.0  # while entries keep coming, the record (status, queue position) is read this often
CONFIRM_TTL_MS = 60_000  # how long the key CONFIRM writes lives
CONFIRM = """
-- KEYS[1] = the turn's record, KEYS[2] = {p}:sync   ARGV[1] = turn id, ARGV[2] = its ttl ms
-- The record's fields (TurnReader.record_fields), read on the primary; the SET is there for the WAIT behind
-- this script: replicas that hold it hold every earlier write too (the turn's end among them).
local v = redis.call('HMGET', KEYS[1], 'status', 'result', 'error', 'attempt', 'queue')
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return v
"""
# What the confirming write may raise besides connection trouble: a failover between loading the script and
# running it (the next try loads it again).
RETRY_CONFIRM = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.NoScriptError)


class EventKind(str, Enum):
    queued = "queued"  # waiting in the queue at `position` (1 = next)
    start = "start"  # an attempt begins (a second one means its first worker was lost)
    delta = "delta"  # text
    done = "done"  # the TurnResult: the end
    error = "error"  # the reason: the end


TERMINAL = (EventKind.done, EventKind.error)


@dataclass
class StreamEvent:
    id: str  # the stream entry id ('' for events not read from the stream)
    kind: EventKind
    attempt: int = 0
    text: str = ""
    result: TurnResult | None = None
    error: str | None = None
    position: int | None = None


def parse_entries(resp: Any) -> list[StreamEvent]:
    """The events of an XREAD reply, in order."""
    out = []
    for _, entries in resp or []:
        for entry_id, fields in entries:
            f = {k.decode(): v.decode() for k, v in fields.items()}
            kind = EventKind(f.get("ev", "delta"))
            result = TurnResult.model_validate_json(f["result"]) if "result" in f else None
            out.append(StreamEvent(entry_id.decode(), kind, int(f.get("a", 0)), f.get("t", ""), result,
                                   f.get("error")))
    return out


class TurnReader:
    """Follows one turn. Call `record_fields` / `on_record`, then `xread` / `on_stream`, until `ended`.
    With `confirm`, an end is held in `pending` instead of returned: run CONFIRM (`confirm_call`) behind
    a WAIT and give its reply to `on_confirm`, which returns the end as the primary holds it, or nothing
    (the turn goes on: keep following)."""

    def __init__(self, keys: Keys, turn_id: str, after: str = "0-0", confirm: bool = False):
        self.turn_key, self.stream_key = keys.turn(turn_id), keys.stream(turn_id)
        self.sync_key = keys.sync
        self.turn_id = turn_id
        self.last = after or "0-0"
        self.status: TurnStatus | None = None
        self.position: int | None = None
        self.ended = False
        self.confirm = confirm
        self.pending: StreamEvent | None = None  # an end read, not yet confirmed on the primary
        self._pending_missing = False  # that end is "no such turn"
        self._record_at = -1e9
        self._record: list[Any] = []

    record_fields = ("status", "result", "error", "attempt", "queue")

    def wants_record(self) -> bool:
        return time.monotonic() - self._record_at >= RECORD_EVERY_S

    def _not_found(self) -> StreamEvent:
        return StreamEvent("", EventKind.error, error=f"turn {self.turn_id!r} not found (expired or deleted)")

    def _end(self, ev: StreamEvent, missing: bool = False) -> list[StreamEvent]:
        """Report `ev` as the turn's end now, or hold it until the primary confirms it."""
        if self.confirm:
            self.pending, self._pending_missing = ev, missing
            return []
        self.ended = True
        return [ev]

    def on_record(self, values: list[Any]) -> list[StreamEvent]:
        """The turn's record was read (`record_fields`, in order); the caller then asks `queue_to_scan`."""
        self._record_at = time.monotonic()
        self._record = values
        if values[0] is None:
            return self._end(self._not_found(), missing=True)
        self.status = TurnStatus(values[0].decode())
        return []

    def queue_to_scan(self) -> str | None:
        """The queue to look for the turn's position in, while it is queued."""
        queue = self._record[4] if self._record else None
        return queue.decode() if self.status is TurnStatus.queued and queue else None

    def on_position(self, position: int) -> list[StreamEvent]:
        if position == self.position:
            return []
        self.position = position
        return [StreamEvent("", EventKind.queued, position=position)]

    def xread(self) -> tuple[dict[str, str], int | None]:
        """XREAD arguments: block only while the turn can still write."""
        finished = self.status is not None and self.status.finished
        return {self.stream_key: self.last}, (None if finished else BLOCK_MS)

    def on_stream(self, resp: Any) -> list[StreamEvent]:
        events = []
        for ev in parse_entries(resp):
            self.last = ev.id
            if ev.kind in TERMINAL:
                return events + self._end(ev)
            events.append(ev)
        if not events and self.status is not None and self.status.finished:
            # The stream expired, or its end was read before a reconnect: the record has the outcome.
            return self._end(self._outcome(self._record, ""))
        if not events:
            self._record_at = -1e9  # nothing new: look at the record before blocking again
        return events

    @staticmethod
    def _outcome(record: list[Any], entry_id: str, attempt: int | None = None) -> StreamEvent:
        """The end a finished record holds (`record_fields`)."""
        status, result, error, n = record[0], record[1], record[2], int(record[3] or 0)
        if TurnStatus(status.decode()) is TurnStatus.done and result:
            return StreamEvent(entry_id, EventKind.done, n if attempt is None else attempt,
                               result=TurnResult.model_validate_json(result))
        return StreamEvent(entry_id, EventKind.error, n if attempt is None else attempt,
                           error=(error or b"the turn failed").decode())

    def confirm_call(self) -> tuple[list[str], list[Any]]:
        """CONFIRM's keys and arguments."""
        return [self.turn_key, self.sync_key], [self.turn_id, CONFIRM_TTL_MS]

    def on_confirm(self, values: list[Any]) -> list[StreamEvent]:
        """CONFIRM's reply (the record on the primary, after the replicas acknowledged a write made behind
        it): the held end as that record has it, or nothing (the primary holds no end: follow on)."""
        held, missing = self.pending, self._pending_missing
        assert held is not None
        self.pending, self._pending_missing = None, False
        self._record_at, self._record = time.monotonic(), values
        if values[0] is None:
            self.ended = True
            return [self._not_found()]
        self.status = TurnStatus(values[0].decode())
        if not self.status.finished or missing:
            # Taken back by a failover (the turn runs again), or read from a node behind the primary: go on
            # reading from the last entry seen (a finished turn's end comes from its stream or record next).
            return []
        self.ended = True
        kind = EventKind.done if self.status is TurnStatus.done else EventKind.error
        if held.kind is kind:  # the end that was read, with the result or reason the primary keeps
            return [self._outcome(values, held.id, held.attempt)]
        return [self._outcome(values, "")]


def follow(r: redis.Redis, keys: Keys, turn_id: str, position: Callable[[str, str], int], after: str = "0-0",
           timeout: float | None = None, replication: Replication | None = None) -> Iterator[StreamEvent | None]:
    """The turn's events (None after each idle wait, for keep-alives), until done or error. A Redis outage
    longer than the client's own retries is waited out (within `timeout`): the turn goes on without us.
    With `replication` waiting for replicas, the end is reported once they hold it (see the module's doc)."""
    confirm = replication is not None and replication.replicas > 0
    rd = TurnReader(keys, turn_id, after, confirm)
    script = r.register_script(CONFIRM) if confirm else None
    end = None if timeout is None else time.monotonic() + timeout
    while not rd.ended:
        events: list[StreamEvent] = []
        try:
            if rd.pending is None and rd.wants_record():
                yield from rd.on_record(r.hmget(rd.turn_key, rd.record_fields))
                if rd.pending is None and not rd.ended and (q := rd.queue_to_scan()) is not None:
                    yield from rd.on_position(position(q, turn_id))
            if rd.pending is None and not rd.ended:
                streams, block = rd.xread()
                events = rd.on_stream(r.xread(streams, block=block, count=256))
                yield from events
            if rd.pending is not None:
                assert replication is not None and script is not None
                final = rd.on_confirm(replication.run(r, script, *rd.confirm_call()))
                yield from final
                events += final
        except RETRY_CONFIRM:
            time.sleep(0.5)
        if not events and not rd.ended:
            if end is not None and time.monotonic() > end:
                raise TimeoutError(f"turn {turn_id} did not finish within {timeout}s")
            yield None


async def afollow(ar: aredis.Redis, keys: Keys, turn_id: str, position: Callable[[str, str], Awaitable[int]],
                  after: str = "0-0", outage_s: float = 30.0,
                  replication: Replication | None = None) -> AsyncIterator[StreamEvent | None]:
    """`follow` for asyncio. A Redis outage is waited out for `outage_s`, then it ends with an error event
    (the turn itself goes on: its record and stream stay readable once Redis is back)."""
    confirm = replication is not None and replication.replicas > 0
    rd = TurnReader(keys, turn_id, after, confirm)
    script = ar.register_script(CONFIRM) if confirm else None
    down_since: float | None = None
    while not rd.ended:
        events: list[StreamEvent] = []
        try:
            if rd.pending is None and rd.wants_record():
                for ev in rd.on_record(await ar.hmget(rd.turn_key, rd.record_fields)):
                    yield ev
                if rd.pending is None and not rd.ended and (q := rd.queue_to_scan()) is not None:
                    for ev in rd.on_position(await position(q, turn_id)):
                        yield ev
            if rd.pending is None and not rd.ended:
                streams, block = rd.xread()
                events = rd.on_stream(await ar.xread(streams, block=block, count=256))
                for ev in events:
                    yield ev
            if rd.pending is not None:
                assert replication is not None and script is not None
                final = rd.on_confirm(await replication.arun(ar, script, *rd.confirm_call()))
                for ev in final:
                    yield ev
                events += final
            down_since = None
        except RETRY_CONFIRM as e:
            now = time.monotonic()
            try:  # a blocking read whose connections keep being dropped is not an outage if Redis answers
                await ar.ping()
                down_since = None
            except (redis.ConnectionError, redis.TimeoutError):
                down_since = down_since or now
                if now - down_since > outage_s:
                    yield StreamEvent("", EventKind.error, error=f"Redis unavailable for {outage_s:g}s ({e}); the "
                                      f"turn goes on: read it again later")
                    return
            await asyncio.sleep(0.5)
        if not events and not rd.ended:
            yield None


# -- what a display shows ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Append:
    text: str  # show this after what is shown


@dataclass(frozen=True)
class Restart:
    text: str  # the reply was restarted and diverged: discard what was shown, show this instead
    attempt: int


@dataclass(frozen=True)
class Done:
    result: TurnResult
    tail: str  # what of the final reply was not shown yet (appended to what is shown)


@dataclass(frozen=True)
class Error:
    message: str


@dataclass(frozen=True)
class Queued:
    position: int


Update = Append | Restart | Done | Error | Queued


class ReplyAssembler:
    def __init__(self) -> None:
        self.shown = ""  # what the consumer has shown
        self.current = ""  # the current attempt's text so far
        self.attempt = 0

    def feed(self, ev: StreamEvent) -> list[Update]:
        if ev.kind is EventKind.queued:
            return [Queued(ev.position or 0)]
        if ev.kind is EventKind.start:
            self.current, self.attempt = "", ev.attempt
            return []
        if ev.kind is EventKind.delta:
            self.current += ev.text
            return self._reconcile()
        if ev.kind is EventKind.done and ev.result is not None:
            final = self.current = ev.result.text
            if final.startswith(self.shown):
                tail, self.shown = final[len(self.shown):], final
                return [Done(ev.result, tail)]
            self.shown = final  # what was shown is not the reply (an earlier attempt's longer text)
            return [Restart(final, ev.result.attempt), Done(ev.result, "")]
        return [Error(ev.error or "the turn failed")]

    def _reconcile(self) -> list[Update]:
        if self.current.startswith(self.shown):
            new, self.shown = self.current[len(self.shown):], self.current
            return [Append(new)] if new else []
        if self.shown.startswith(self.current):
            return []  # the new attempt has not caught up with what was shown yet
        self.shown = self.current
        return [Restart(self.current, self.attempt)]
