"""The worker's side of a turn in Redis, each step one atomic Lua script.

begin     queued -> running: attempt += 1 (a fencing token), a lease in `{p}:running`, a start marker
          on the stream. A turn already finished is skipped (a duplicate delivery); a turn running
          under a live lease belongs to another delivery and is skipped too, so a redelivery never
          takes a live turn away from its worker. Only a lease that expired (its worker is gone)
          is taken over. A turn whose workers vanished max_attempts times is failed (poison).
commit    append the reply and mark the turn done, only if this attempt still owns it; the conversation
          records this worker as the one holding its KV cache (its next turn is routed here)
fail      mark failed with a reason and take the user message back out (nothing half-stored)
requeue   running -> queued, pushing the turn's kept task message onto its home (the model's shared
          queue) again: a cold shutdown hands its turns back this way (fenced by attempt), and the
          watchdog does it for turns whose lease expired (their worker died or froze)
lost      the watchdog's second sweep: a queued turn whose message is on no queue and held by no
          live delivery (lost between Redis and a worker that died) is queued again, on its home
dead      dead-letter a delivery or payload that cannot be served, with the reason

Every script may run twice when a connection drops after Redis executed it but before the reply
arrived (the client retries): each one is written so that a second run changes nothing more.
Leases and queue times use Redis' clock (TIME), so workers on hosts with skewed clocks agree.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from enum import Enum

import redis

from shared.keys import Keys
from shared.lua import PRELUDE
from shared.replication import Replication

BEGIN = PRELUDE + """
-- KEYS: turn, stream, running, queued
-- ARGV: worker, started_at, max_attempts, maxlen, stream ttl, turn id, delivery id, lease s, result ttl
local now = now_s()
local s = redis.call('HMGET', KEYS[1], 'status', 'delivery', 'attempt', 'conv_key')
if not s[1] then return {'missing', 0} end
if s[1] == 'done' or s[1] == 'failed' then return {'finished', 0} end
if s[1] == 'running' then
  if s[2] == ARGV[7] then return {'ok', tonumber(s[3])} end  -- this delivery's own BEGIN, run again
  local exp = redis.call('ZSCORE', KEYS[3], ARGV[6])
  if exp and tonumber(exp) > now then return {'held', tonumber(s[3])} end
  redis.call('HINCRBY', KEYS[1], 'lost', 1)  -- its worker vanished before the watchdog noticed
end
if not s[4] or redis.call('EXISTS', s[4]) == 0 then
  fail_turn(KEYS[1], ARGV[6], 'the conversation was deleted', s[3] or 0, ARGV[2], ARGV[4], ARGV[5],
            ARGV[9], KEYS[3], KEYS[4])
  return {'finished', 0}
end
local lost = tonumber(redis.call('HGET', KEYS[1], 'lost') or '0')
if lost >= tonumber(ARGV[3]) then
  local err = 'gave up after ' .. lost .. ' attempts (each ended with its worker lost)'
  fail_turn(KEYS[1], ARGV[6], err, s[3] or 0, ARGV[2], ARGV[4], ARGV[5], ARGV[9], KEYS[3], KEYS[4])
  return {'poison', tonumber(s[3] or 0)}
end
local a = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1], 'delivery', ARGV[7], 'started_at', ARGV[2],
           'fseq', 0)
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[8]), ARGV[6])
redis.call('ZREM', KEYS[4], ARGV[6])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'ev', 'start', 'a', a)
redis.call('EXPIRE', KEYS[2], ARGV[5])
return {'ok', a}
"""

COMMIT = """
-- KEYS: turn, stream, running, queued
-- ARGV: attempt, (unused), message json, result json, maxlen, stream ttl, finished_at, turn id, result ttl,
--       delivery, then the stream's unflushed tail as (seq, text) pairs
local s = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'committed', 'conv_key', 'fseq', 'worker')
if s[1] == 'done' then
  if s[3] == ARGV[10] then return 1 end  -- this delivery's own commit, run again
  return 0
end
if s[1] ~= 'running' or s[2] ~= ARGV[1] then return -1 end
local fseq = tonumber(s[5] or '0')
for i = 11, #ARGV, 2 do  -- what a flush whose reply was lost may already have written is skipped
  if tonumber(ARGV[i]) > fseq and ARGV[i + 1] ~= '' then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'a', ARGV[1], 't', ARGV[i + 1])
  end
end
local conv = s[4]
if conv and redis.call('EXISTS', conv) == 1 then  -- a deleted conversation gets nothing written
  local msgs = conv .. ':messages'
  redis.call('RPUSH', msgs, ARGV[3])
  local ttl = redis.call('PTTL', conv)
  if ttl > 0 then redis.call('PEXPIRE', msgs, ttl) end
  if redis.call('HGET', conv, 'busy') == ARGV[8] then redis.call('HDEL', conv, 'busy') end
  -- This worker holds the conversation's KV cache now: its next turn is routed here (producer/store.py START).
  if s[6] then redis.call('HSET', conv, 'worker', s[6]) end
end
redis.call('HSET', KEYS[1], 'status', 'done', 'result', ARGV[4], 'finished_at', ARGV[7], 'committed', ARGV[10])
redis.call('HDEL', KEYS[1], 'message')
redis.call('ZREM', KEYS[3], ARGV[8])
redis.call('ZREM', KEYS[4], ARGV[8])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'ev', 'done', 'a', ARGV[1], 'result', ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('EXPIRE', KEYS[1], ARGV[9])
return 1
"""

FAIL = PRELUDE + """
-- KEYS: turn, stream, running, queued
-- ARGV: attempt (0 = a delivery that never began: only a queued turn is failed), error, maxlen, stream ttl,
--       finished_at, turn id, result ttl
local s = redis.call('HMGET', KEYS[1], 'status', 'attempt')
if not s[1] then return -2 end
if s[1] == 'done' or s[1] == 'failed' then return 0 end
if ARGV[1] == '0' then
  if s[1] ~= 'queued' then return -1 end  -- running: a live delivery answers it, not this bad copy
elseif s[1] ~= 'running' or s[2] ~= ARGV[1] then
  return -1
end
fail_turn(KEYS[1], ARGV[6], ARGV[2], ARGV[1], ARGV[5], ARGV[3], ARGV[4], ARGV[7], KEYS[3], KEYS[4])
return 1
"""

# Queue a running turn again from its kept task message, on its home (the model's shared queue: its worker is
# stopping or gone, so not that worker's own queue; a turn stored before `home` existed has only `queue`).
# ARGV[2] = attempt: a worker handing its own turn back (fenced); '' = the watchdog, for a turn whose lease
# has expired (its worker is counted as lost).
REQUEUE = PRELUDE + """
local function requeue(turn, tid, attempt, running, queued, now)
  local s = redis.call('HMGET', turn, 'status', 'attempt', 'queue', 'message', 'home')
  if s[1] ~= 'running' then return 0 end
  if attempt ~= '' then
    if s[2] ~= attempt then return -1 end
  else
    local exp = redis.call('ZSCORE', running, tid)
    if exp and tonumber(exp) > now then return 0 end
    redis.call('HINCRBY', turn, 'lost', 1)
  end
  redis.call('ZREM', running, tid)
  local home = s[5] or s[3]
  if not home or not s[4] then return -3 end  -- no kept message: the next delivery of the old one begins it
  redis.call('HSET', turn, 'status', 'queued', 'queued_at', now, 'queue', home)
  redis.call('HDEL', turn, 'worker', 'delivery')
  redis.call('ZADD', queued, now, tid)
  redis.call('RPUSH', home, s[4])  -- the served end: it has waited its turn already
  return 1
end
"""

HAND_BACK = REQUEUE + """
-- KEYS: turn, running, queued   ARGV: turn id, attempt
return requeue(KEYS[1], ARGV[1], ARGV[2], KEYS[2], KEYS[3], now_s())
"""

RESCUE_EXPIRED = REQUEUE + """
-- KEYS: running, queued   ARGV: turn key prefix, limit
local now = now_s()
local out = {}
for _, tid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))) do
  local turn = ARGV[1] .. tid
  local st = redis.call('HGET', turn, 'status')
  if st ~= 'running' then
    redis.call('ZREM', KEYS[1], tid)  -- finished, or never begun: not a lease any more
  elseif requeue(turn, tid, '', KEYS[1], KEYS[2], now) == 1 then
    out[#out + 1] = tid
  end
end
return out
"""

# A queued turn is present when its id is on its queue, on its home (where kombu restores a delivery it
# took back), or in a delivery younger than `min age` in kombu's unacked hash (a live worker begins what it
# receives within milliseconds; an older entry belongs to a worker that died). Otherwise its message was
# lost in transit: push the kept copy again, onto its home. Runs under a lock, so one worker of the pool
# scans at a time.
LOST_QUEUED = PRELUDE + """
-- KEYS: queued, unacked hash, unacked index, running, lock
-- ARGV: turn key prefix, min age s, limit, lock ms, max_attempts, maxlen, stream ttl, result ttl
if not redis.call('SET', KEYS[5], '1', 'NX', 'PX', ARGV[4]) then return {} end
local now = now_s()
local cands = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]), 'LIMIT', 0, tonumber(ARGV[3]))
if #cands == 0 then return {} end
local present = {}
local function mark(item)
  local id = string.match(item, '"correlation_id": "([%w_%-]+)"')
  if id then present[id] = true end
end
local fresh = redis.call('ZRANGEBYSCORE', KEYS[3], now - tonumber(ARGV[2]), '+inf')
for i = 1, #fresh, 500 do
  local vals = redis.call('HMGET', KEYS[2], unpack(fresh, i, math.min(i + 499, #fresh)))
  for _, v in ipairs(vals) do if v then mark(v) end end
end
local scanned = {}
local out = {}
for _, tid in ipairs(cands) do
  local turn = ARGV[1] .. tid
  local s = redis.call('HMGET', turn, 'status', 'queue', 'message', 'lost', 'home')
  local home = s[5] or s[2]
  if s[1] ~= 'queued' then
    redis.call('ZREM', KEYS[1], tid)
  elseif s[2] and s[3] then
    for _, q in ipairs({s[2], home}) do
      if not scanned[q] then
        scanned[q] = true
        for _, item in ipairs(redis.call('LRANGE', q, 0, -1)) do mark(item) end
      end
    end
    if not present[tid] then
      local lost = redis.call('HINCRBY', turn, 'lost', 1)
      if lost >= tonumber(ARGV[5]) then
        fail_turn(turn, tid, 'gave up: its task message was lost ' .. lost .. ' times', 0, now,
                  ARGV[6], ARGV[7], ARGV[8], KEYS[4], KEYS[1])
      else
        redis.call('RPUSH', home, s[3])
        redis.call('HSET', turn, 'queue', home)
        redis.call('ZADD', KEYS[1], now, tid)
        present[tid] = true
      end
      out[#out + 1] = tid
    end
  end
end
return out
"""


DEAD_LETTERS = 10_000  # dead letters kept in `{p}:dead`


class Claim(str, Enum):
    """What BEGIN says about a delivery."""

    ok = "ok"  # this delivery owns the turn now, under the returned attempt
    held = "held"  # another live delivery is generating it: this one is a duplicate
    finished = "finished"  # done or failed already (or its conversation was deleted)
    missing = "missing"  # no such turn: not created by a producer
    poison = "poison"  # its workers vanished max_attempts times: failed now


class Commit(int, Enum):
    """What COMMIT says."""

    done = 1  # this attempt's reply is the turn's reply
    duplicate = 0  # another attempt committed first
    stale = -1  # this attempt no longer owns the turn


class Fail(int, Enum):
    """What FAIL says."""

    failed = 1  # the turn is failed now, with the error
    finished = 0  # done or failed already: nothing changed
    not_ours = -1  # another attempt owns it (attempt 0: the turn is not queued, a live delivery answers it)
    missing = -2  # no such turn: nothing is created for an id no producer made


class HandBack(int, Enum):
    """What HAND_BACK says."""

    queued = 1  # queued again from its kept task message
    not_running = 0  # finished or queued meanwhile: nothing to hand back
    not_ours = -1  # another attempt owns it
    no_message = -3  # stored before task messages were kept: the delivery itself must go back (Reject)


@dataclass(frozen=True)
class Lease:
    status: Claim
    attempt: int


class TurnStore:
    """The scripts above, bound to one worker. `lease_s`: how long a claim lives without renewal (the
    stream flusher renews it every half second for every turn it streams)."""

    def __init__(
        self,
        r: redis.Redis,
        keys: Keys,
        *,
        stream_maxlen: int = 10_000,
        stream_ttl_s: int = 3600,
        max_attempts: int = 3,
        worker: str = "",
        result_ttl_s: int = 86_400,
        lease_s: float = 10.0,
        replication: Replication | None = None,
    ):
        self.r = r
        self.replication = replication or Replication()  # begin, commit, fail, hand back wait for replicas
        self.keys = keys
        self.maxlen = stream_maxlen
        self.ttl = stream_ttl_s
        self.max_attempts = max_attempts
        self.result_ttl = result_ttl_s
        self.worker = worker
        self.lease_s = lease_s
        self._begin = r.register_script(BEGIN)
        self._commit = r.register_script(COMMIT)
        self._fail = r.register_script(FAIL)
        self._hand_back = r.register_script(HAND_BACK)
        self._rescue = r.register_script(RESCUE_EXPIRED)
        self._lost = r.register_script(LOST_QUEUED)

    def _turn_keys(self, turn_id: str) -> list[str]:
        return [self.keys.turn(turn_id), self.keys.stream(turn_id), self.keys.running, self.keys.queued]

    def begin(self, turn_id: str, delivery: str) -> Lease:
        """Claim the turn for this delivery (`delivery`: an id unique to it, so a retried call is safe)."""
        status, attempt = self.replication.run(
            self.r, self._begin, self._turn_keys(turn_id),
            [self.worker, time.time(), self.max_attempts, self.maxlen, self.ttl, turn_id, delivery, self.lease_s,
             self.result_ttl],
        )
        return Lease(Claim(status.decode() if isinstance(status, bytes) else status), int(attempt))

    def commit(
        self,
        turn_id: str,
        attempt: int,
        delivery: str,
        tail: list[tuple[int, str]],
        message_json: str,
        result_json: str,
    ) -> Commit:
        """Append the reply and finish the turn, fenced by attempt. `tail`: the stream's unflushed
        (seq, text) entries (StreamPublisher.take), written to the stream first."""
        args: list[object] = [attempt, "", message_json, result_json, self.maxlen, self.ttl, time.time(), turn_id,
                              self.result_ttl, delivery]
        for seq, text in tail:
            args += [seq, text]
        return Commit(int(self.replication.run(self.r, self._commit, self._turn_keys(turn_id), args)))

    def fail(self, turn_id: str, attempt: int, error: str) -> Fail:
        """Fail the turn with `error`, fenced by `attempt` (0: a delivery that never began, which may fail
        only a queued turn)."""
        return Fail(int(self.replication.run(
            self.r, self._fail, self._turn_keys(turn_id),
            [attempt, error, self.maxlen, self.ttl, time.time(), turn_id, self.result_ttl],
        )))

    def hand_back(self, turn_id: str, attempt: int) -> HandBack:
        """Queue this attempt's turn again (cold shutdown), fenced by `attempt`."""
        return HandBack(int(self.replication.run(
            self.r, self._hand_back, [self.keys.turn(turn_id), self.keys.running, self.keys.queued],
            [turn_id, attempt])))

    def rescue_expired(self, limit: int = 100) -> list[str]:
        """Queue again the running turns whose lease expired; returns their ids."""
        out = self._rescue(keys=[self.keys.running, self.keys.queued], args=[self.keys.turn_prefix, limit])
        return [t.decode() for t in out]

    def requeue_lost(self, unacked: str, unacked_index: str, min_age_s: float, limit: int = 100) -> list[str]:
        """Queue again the queued turns whose message no queue and no live delivery holds; returns their
        ids. One worker of the pool scans per `min_age_s / 2` (a lock in Redis)."""
        out = self._lost(
            keys=[self.keys.queued, unacked, unacked_index, self.keys.running, f"{self.keys.prefix}:lock:lost"],
            args=[self.keys.turn_prefix, min_age_s, limit, int(min_age_s * 500), self.max_attempts, self.maxlen,
                  self.ttl, self.result_ttl],
        )
        return [t.decode() for t in out]

    def dead_letter(self, payload: object, reason: str) -> None:
        """Keep the delivery or payload with the reason, newest first; only the newest DEAD_LETTERS are kept, so a
        flood of garbage cannot fill Redis."""
        entry = json.dumps({"payload": payload, "reason": reason, "at": time.time(), "worker": self.worker},
                           default=str)
        pipe = self.r.pipeline(transaction=True)
        pipe.lpush(self.keys.dead, entry)
        pipe.ltrim(self.keys.dead, 0, DEAD_LETTERS - 1)
        pipe.execute()
