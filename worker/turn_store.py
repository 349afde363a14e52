"""The worker's side of a turn in Redis, each step one atomic Lua script.

begin   queued|running -> running, attempt += 1 (a fencing token), start marker on the stream;
        a turn already done/failed is skipped (duplicate delivery); past max_attempts -> failed
commit  append the reply to the conversation and mark the turn done, only if this attempt
        still owns it: a redelivered, duplicated or stale attempt never appends a second reply
fail    mark failed with a reason and take the user message back out (nothing half-stored)
dead    dead-letter a payload that cannot be served, with the reason
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis

from shared.keys import Keys

BEGIN = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {'missing', 0} end
if st == 'done' or st == 'failed' then return {'finished', 0} end
local a = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
if a > tonumber(ARGV[3]) then
  local err = 'gave up after ' .. (a - 1) .. ' attempts (each ended with its worker lost)'
  redis.call('HSET', KEYS[1], 'status', 'failed', 'error', err, 'finished_at', ARGV[2])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'ev', 'error', 'a', a, 'error', err)
  local conv = redis.call('HGET', KEYS[1], 'conv_key')
  if conv and redis.call('HGET', conv, 'busy') == ARGV[6] then redis.call('HDEL', conv, 'busy') end
  local um = redis.call('HGET', KEYS[1], 'user_message')
  if um and conv then redis.call('LREM', conv .. ':messages', -1, um) end
  return {'poison', a}
end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1], 'started_at', ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'ev', 'start', 'a', a)
redis.call('EXPIRE', KEYS[2], ARGV[5])
return {'ok', a}
"""

COMMIT = """
local s = redis.call('HMGET', KEYS[1], 'status', 'attempt')
if s[1] == 'done' then return 0 end
if s[1] ~= 'running' or s[2] ~= ARGV[1] then return -1 end
if ARGV[2] ~= '' then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'a', ARGV[1], 't', ARGV[2])
end
redis.call('RPUSH', KEYS[2], ARGV[3])
redis.call('HSET', KEYS[1], 'status', 'done', 'result', ARGV[4], 'finished_at', ARGV[7])
if redis.call('HGET', KEYS[4], 'busy') == ARGV[8] then redis.call('HDEL', KEYS[4], 'busy') end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'ev', 'done', 'a', ARGV[1], 'result', ARGV[4])
redis.call('EXPIRE', KEYS[3], ARGV[6])
redis.call('EXPIRE', KEYS[1], ARGV[9])
return 1
"""

FAIL = """
local s = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'user_message')
if not s[1] then return -2 end
if s[1] == 'done' or s[1] == 'failed' then return 0 end
if ARGV[1] ~= '0' and s[2] ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], 'status', 'failed', 'error', ARGV[2], 'finished_at', ARGV[5])
if s[3] then redis.call('LREM', KEYS[2], -1, s[3]) end
if redis.call('HGET', KEYS[4], 'busy') == ARGV[6] then redis.call('HDEL', KEYS[4], 'busy') end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'ev', 'error', 'a', ARGV[1], 'error', ARGV[2])
redis.call('EXPIRE', KEYS[3], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[7])
return 1
"""


@dataclass
class Lease:
    status: str  # ok | missing | finished | poison
    attempt: int


class TurnStore:
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
    ):
        self.r = r
        self.keys = keys
        self.maxlen = stream_maxlen
        self.ttl = stream_ttl_s
        self.max_attempts = max_attempts
        self.result_ttl = result_ttl_s
        self.worker = worker
        self._begin = r.register_script(BEGIN)
        self._commit = r.register_script(COMMIT)
        self._fail = r.register_script(FAIL)

    def begin(self, turn_id: str) -> Lease:
        status, attempt = self._begin(
            keys=[self.keys.turn(turn_id), self.keys.stream(turn_id)],
            args=[self.worker, time.time(), self.max_attempts, self.maxlen, self.ttl, turn_id],
        )
        return Lease(status.decode() if isinstance(status, bytes) else status, int(attempt))

    def commit(
        self, turn_id: str, conversation_id: str, attempt: int, tail: str, message_json: str, result_json: str
    ) -> int:
        """1 committed, 0 already committed by an earlier attempt, -1 this attempt no longer owns the turn."""
        return int(
            self._commit(
                keys=[
                    self.keys.turn(turn_id),
                    self.keys.messages(conversation_id),
                    self.keys.stream(turn_id),
                    self.keys.conv(conversation_id),
                ],
                args=[
                    attempt,
                    tail,
                    message_json,
                    result_json,
                    self.maxlen,
                    self.ttl,
                    time.time(),
                    turn_id,
                    self.result_ttl,
                ],
            )
        )

    def fail(self, turn_id: str, conversation_id: str, attempt: int, error: str) -> int:
        """1 failed, 0 already finished, -1 this attempt no longer owns the turn, -2 no such turn (nothing
        is created for an id no producer made)."""
        return int(
            self._fail(
                keys=[
                    self.keys.turn(turn_id),
                    self.keys.messages(conversation_id),
                    self.keys.stream(turn_id),
                    self.keys.conv(conversation_id),
                ],
                args=[attempt, error, self.maxlen, self.ttl, time.time(), turn_id, self.result_ttl],
            )
        )

    def dead_letter(self, payload: object, reason: str) -> None:
        self.r.lpush(
            self.keys.dead,
            json.dumps({"payload": payload, "reason": reason, "at": time.time(), "worker": self.worker}, default=str),
        )
