"""Token deltas to Redis Streams, coalesced per worker; the same round trip renews the turns' leases.

Every attempt's new text is buffered, and one flusher thread writes all of this worker's buffers in a
single script call every `flush_ms`: Redis sees one round trip per worker per interval, whatever
the number of turns or tokens. The interval grows with the streams a worker carries (`interval()`:
x1 up to 2 streams, to x4 at 8 or more), because every flush costs each reader a wake-up on the same
machines as the engine: at 8 streams on 2 cores a 50 ms interval took 17% of the decode throughput
over HTTP (docs/BENCHMARKS.md). A turn's first text is the exception: it wakes the flusher at once,
so time to first token never waits for the interval. The same call

- fences each write with the turn's attempt: a stale attempt's text is refused and the attempt is
  told (STALE), so it stops generating at its next step;
- reports producer cancellations back to the attempt (CANCELLED);
- renews the attempt's lease in `{p}:running` (an idle attempt is still visited every
  `check_every_s`), so the watchdog only ever requeues turns whose worker stopped flushing;
- carries a sequence number per attempt, so a flush that Redis ran but whose reply was lost (the
  connection dropped) and that is therefore sent again appends nothing twice.

Registrations are per attempt, not per turn: two deliveries of one turn on the same worker each
stream under their own registration, and the stale one learns it is stale at its next flush.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

import redis

from shared.keys import Keys
from shared.replication import Replication

log = logging.getLogger(__name__)


class Signal(IntEnum):
    """What a flush tells an attempt."""

    ok = 0
    cancelled = 1  # the producer asked to stop: finish with what was generated
    stale = 2  # another attempt owns the turn (or it ended): stop, commit nothing


FLUSH = """
-- KEYS[1] = running zset, then (turn, stream) per entry; ARGV[1] = maxlen, ARGV[2] = lease s,
-- then (turn id, attempt, seq, text) per entry
local t = redis.call('TIME')
local expiry = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[2])
local out = {}
for i = 1, (#KEYS - 1) / 2 do
  local th, st = KEYS[2 * i], KEYS[2 * i + 1]
  local tid, a, seq, txt = ARGV[4 * i - 1], ARGV[4 * i], ARGV[4 * i + 1], ARGV[4 * i + 2]
  local s = redis.call('HMGET', th, 'status', 'attempt', 'cancel', 'fseq')
  if s[1] ~= 'running' or s[2] ~= a then
    out[i] = 2
  else
    if tonumber(seq) > tonumber(s[4] or '0') then
      if txt ~= '' then redis.call('XADD', st, 'MAXLEN', '~', ARGV[1], '*', 'a', a, 't', txt) end
      redis.call('HSET', th, 'fseq', seq)
    end
    redis.call('ZADD', KEYS[1], 'XX', expiry, tid)
    out[i] = s[3] and 1 or 0
  end
end
return out
"""


@dataclass(eq=False)
class Attempt:
    """One attempt's registration: what it has not flushed yet, and how to tell it to stop."""

    turn_id: str
    attempt: int
    on_signal: Callable[[Signal], None]
    buf: str = ""
    seq: int = 0  # flushes sent for this attempt
    unsure: list[tuple[int, str]] | None = None  # a flush whose reply was lost: sent again as it was
    checked: float = 0.0
    started: bool = False  # has any text been flushed yet
    done: bool = False


class StreamPublisher:
    def __init__(
        self,
        r: redis.Redis,
        keys: Keys,
        *,
        flush_ms: int = 50,
        maxlen: int = 10_000,
        check_every_s: float = 0.5,
        lease_s: float = 10.0,
        replication: Replication | None = None,
    ):
        self.r = r
        self.replication = replication or Replication()  # each flush waits for replicas
        self.keys = keys
        self.flush_s = flush_ms / 1000
        self.maxlen = maxlen
        self.check_every_s = check_every_s  # idle attempts are still checked (and their leases renewed) this often
        self.lease_s = lease_s
        self._script = r.register_script(FLUSH)
        self._attempts: set[Attempt] = set()
        self._lock = threading.Lock()  # guards _attempts and buffers
        self._io = threading.Lock()  # held during a flush: take() waits, so the commit comes last
        self._stop = threading.Event()
        self._kick = threading.Event()  # flush now (a turn's first text)
        self.heartbeat: Callable[[], None] | None = None  # called every `heartbeat_s` by the flusher
        self.heartbeat_s = 5.0
        self._thread: threading.Thread | None = None
        self.flushes = 0

    def start(self) -> StreamPublisher:
        self._thread = threading.Thread(target=self._run, name="stream-flusher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._kick.set()
        if self._thread:
            self._thread.join(5)

    def interval(self) -> float:
        """Seconds between flushes: flush_ms, times half the streams in flight, between x1 and x4."""
        return self.flush_s * min(4.0, max(1.0, len(self._attempts) / 2))

    def register(self, turn_id: str, attempt: int, on_signal: Callable[[Signal], None]) -> Attempt:
        a = Attempt(turn_id, attempt, on_signal, checked=time.monotonic())
        with self._lock:
            self._attempts.add(a)
        return a

    def append(self, a: Attempt, text: str) -> None:
        """Buffer text for the next flush (never I/O here: the engine thread calls this). The first text of
        an attempt, or any text with flush_ms 0, wakes the flusher at once."""
        with self._lock:
            if a.done:
                return
            a.buf += text
            first = not a.started
            a.started = True
        if first or self.flush_s == 0:
            self._kick.set()

    def take(self, a: Attempt) -> list[tuple[int, str]]:
        """Unregister the attempt and return what it has not surely flushed, as (seq, text) entries for
        the final commit (which appends each entry whose seq Redis has not seen yet)."""
        with self._io, self._lock:
            self._attempts.discard(a)
            a.done = True
            out = list(a.unsure or [])
            if a.buf:
                a.seq += 1
                out.append((a.seq, a.buf))
            a.unsure, a.buf = None, ""
            return out

    def _run(self) -> None:
        beat = 0.0
        while not self._stop.is_set():
            self._kick.wait(self.interval())
            self._kick.clear()
            try:
                self.flush()
            except redis.RedisError as e:  # Redis restarting: keep the text, retry next interval
                log.warning("stream flush failed (will retry): %s", e)
            if self.heartbeat is not None and time.monotonic() - beat >= self.heartbeat_s:
                beat = time.monotonic()
                try:
                    self.heartbeat()
                except redis.RedisError as e:
                    log.warning("heartbeat failed (will retry): %s", e)

    def flush(self) -> None:
        with self._io:
            now = time.monotonic()
            with self._lock:
                entries: list[tuple[Attempt, int, str]] = []
                for a in self._attempts:
                    if not (a.buf or a.unsure or now - a.checked >= self.check_every_s):
                        continue
                    # A flush that may have run (its reply was lost) goes again with its own seq first, so
                    # Redis skips it if it ran; what was appended since gets the next seq.
                    entries += [(a, seq, text) for seq, text in a.unsure or []]
                    a.unsure = None
                    a.seq += 1
                    entries.append((a, a.seq, a.buf))
                    a.buf = ""
                    a.checked = now
            if not entries:
                return
            keys: list[str] = [self.keys.running]
            args: list[object] = [self.maxlen, self.lease_s]
            for a, seq, text in entries:
                keys += [self.keys.turn(a.turn_id), self.keys.stream(a.turn_id)]
                args += [a.turn_id, a.attempt, seq, text]
            try:
                codes = self.replication.run(self.r, self._script, keys, args)
            except redis.RedisError:
                with self._lock:
                    for a, seq, text in entries:
                        a.unsure = (a.unsure or []) + [(seq, text)]
                raise
            self.flushes += 1
        signals: dict[Attempt, Signal] = {}
        for (a, _, _), code in zip(entries, codes):
            if code != Signal.ok:
                signals[a] = Signal(int(code))
        for a, sig in signals.items():
            a.on_signal(sig)
