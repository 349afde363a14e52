"""Token deltas to Redis Streams, coalesced per worker.

Every turn's new text is buffered, and one flusher thread writes all of this worker's buffers in a
single script call every `flush_ms`: Redis sees one round trip per worker per interval, whatever
the number of turns or tokens. A turn's first text is the exception: it wakes the flusher at once,
so time to first token does not wait for the interval. The same call fences each write with the turn's attempt (a stale
attempt's text is refused) and reports producer cancellations back to the turn.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from shared.keys import Keys

log = logging.getLogger(__name__)

OK, CANCELLED, STALE = 0, 1, 2

FLUSH = """
local out = {}
for i = 1, #KEYS / 2 do
  local th, st = KEYS[2 * i - 1], KEYS[2 * i]
  local a, txt = ARGV[2 * i], ARGV[2 * i + 1]
  local s = redis.call('HMGET', th, 'status', 'attempt', 'cancel')
  if s[1] ~= 'running' or s[2] ~= a then
    out[i] = 2
  else
    if txt ~= '' then redis.call('XADD', st, 'MAXLEN', '~', ARGV[1], '*', 'a', a, 't', txt) end
    out[i] = s[3] and 1 or 0
  end
end
return out
"""


@dataclass
class _Turn:
    turn_id: str
    attempt: int
    on_signal: Callable[[int], None]  # called with CANCELLED or STALE
    buf: str = ""
    checked: float = 0.0
    started: bool = False  # has any text been flushed yet


class StreamPublisher:
    def __init__(
        self, r: redis.Redis, keys: Keys, *, flush_ms: int = 50, maxlen: int = 10_000, check_every_s: float = 0.5
    ):
        self.r = r
        self.keys = keys
        self.flush_s = flush_ms / 1000
        self.maxlen = maxlen
        self.check_every_s = check_every_s  # idle turns are still checked for cancellation this often
        self._script = r.register_script(FLUSH)
        self._turns: dict[str, _Turn] = {}
        self._lock = threading.Lock()  # guards _turns and buffers
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

    def register(self, turn_id: str, attempt: int, on_signal: Callable[[int], None]) -> None:
        with self._lock:
            self._turns[turn_id] = _Turn(turn_id, attempt, on_signal, checked=time.monotonic())

    def append(self, turn_id: str, text: str) -> None:
        with self._lock:
            t = self._turns.get(turn_id)
            if t is None:
                return
            t.buf += text
            first = not t.started
            t.started = True
        if self.flush_s == 0:
            self.flush()
        elif first:
            self._kick.set()

    def take(self, turn_id: str) -> str:
        """Unregister the turn and return its unflushed text (for the final commit)."""
        with self._io, self._lock:
            t = self._turns.pop(turn_id, None)
            return t.buf if t else ""

    def _run(self) -> None:
        beat = 0.0
        while not self._stop.is_set():
            self._kick.wait(self.flush_s)
            self._kick.clear()
            try:
                self.flush()
                if self.heartbeat is not None and time.monotonic() - beat >= self.heartbeat_s:
                    beat = time.monotonic()
                    self.heartbeat()
            except redis.RedisError as e:  # Redis restarting: keep the text, retry next interval
                log.warning("stream flush failed (will retry): %s", e)

    def flush(self) -> None:
        with self._io:
            now = time.monotonic()
            with self._lock:
                batch = [t for t in self._turns.values() if t.buf or now - t.checked >= self.check_every_s]
                sent = [(t, t.buf) for t in batch]
                for t in batch:
                    t.buf = ""
                    t.checked = now
            if not sent:
                return
            keys: list[str] = []
            args: list[object] = [self.maxlen]
            for t, text in sent:
                keys += [self.keys.turn(t.turn_id), self.keys.stream(t.turn_id)]
                args += [t.attempt, text]
            try:
                codes = self._script(keys=keys, args=args)
            except redis.RedisError:
                with self._lock:  # put the text back in front of anything appended meanwhile
                    for t, text in sent:
                        t.buf = text + t.buf
                raise
            self.flushes += 1
        for (t, _), code in zip(sent, codes):
            if code in (CANCELLED, STALE):
                t.on_signal(int(code))
