"""Conversation state in Redis (layout: shared/keys.py). Nothing lives in the producer process, so a
producer restart loses nothing. Each change is one Lua script, so nothing is stored half-way, and each
script is safe to run twice (a retried call after a dropped connection changes nothing more).

start    store the user message, create the turn and push its task message onto the queue it is routed
         to (a worker's own queue or the model's shared one), all in one step (or nothing: conversation
         busy or changed, no live worker, queue full)
withdraw a turn whose START reply was lost: ended if still queued, else reported as started
cancel   a running turn is asked to stop at its next step (its partial reply is kept); a turn that no
         worker holds (queued, or its worker gone) ends at once with an empty reply, finish_reason
         cancelled, so its conversation is free even when no worker serves its model
delete   the conversation goes; its turn in flight is stopped and nothing is written for it afterwards
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from enum import Enum

import redis

from shared.errors import InvalidInput, NotFound
from shared.keys import Keys, check_id
from shared.lua import PRELUDE
from shared.messages import ChatMessage, Role, check_text, is_blank
from shared.replication import Replication
from shared.wire import FinishReason, TurnResult, TurnStatus

START = PRELUDE + """
-- KEYS: conv, messages, turn, home queue (the model's shared one), queued zset, live zset, arriving zset
--       (shared/arrivals.py), routed set
-- ARGV: 1 turn id, 2 conversation id, 3 user message json, 4 enqueued_at, 5 task message,
--       6 expected last turn ('' for none), 7 history cap, 8 require a live worker, 9 max queue depth (-1: none),
--       10 model, 11 create the conversation ('1'), 12 its ttl s (0 = none), 13 n: how many of the
--       arguments after 18 are its hash (field, value) pairs, 14 turn key prefix, 15 route to a worker's own
--       queue ('1'), 16 the preferred worker for a conversation none has answered yet ('' for none),
--       17 a worker's own queue less its name, 18 the own-queue length that counts as overloaded,
--       then 2n field/value arguments, then its earlier messages (create only)
local now = now_s()
redis.call('ZREM', KEYS[7], ARGV[1])  -- whatever the answer, the turn is no longer about to be queued
if redis.call('EXISTS', KEYS[3]) == 1 then return {'exists'} end
if ARGV[11] == '1' then
  if redis.call('EXISTS', KEYS[1]) == 1 then return {'conflict'} end
else
  local c = redis.call('HMGET', KEYS[1], 'model', 'busy', 'turn')
  if not c[1] then return {'missing'} end
  if c[2] then
    local st = redis.call('HGET', ARGV[14] .. c[2], 'status')
    if st == 'queued' or st == 'running' then return {'busy', c[2]} end
  end
  if (c[3] or '') ~= ARGV[6] or c[1] ~= ARGV[10] then return {'changed'} end
end
if ARGV[8] == '1' and redis.call('ZCOUNT', KEYS[6], now, '+inf') == 0 then return {'no_worker'} end
-- Where the turn goes: the own queue of the worker that holds its conversation's KV cache (the one that
-- answered its last turn, else the producer's rendezvous pick) if that worker is live and not overloaded,
-- else the shared queue. Decided here, with the liveness check, so a worker that died is never chosen.
local target, chosen = KEYS[4], nil
if ARGV[15] == '1' then
  local w = ARGV[16]
  if ARGV[11] ~= '1' then w = redis.call('HGET', KEYS[1], 'worker') or w end
  if w ~= '' then
    local exp = redis.call('ZSCORE', KEYS[6], w)
    local own = ARGV[17] .. w
    -- A key of another type where the own queue or the routed set belongs (not ours to repair here: the
    -- worker's sweep does) sends the turn to the shared queue, before anything is written.
    local fit = kind(own) .. ',' .. kind(KEYS[8])
    if exp and tonumber(exp) > now and (fit == 'list,set' or fit == 'none,set' or fit == 'list,none'
        or fit == 'none,none') and redis.call('LLEN', own) < tonumber(ARGV[18]) then
      target, chosen = own, w
    end
  end
end
local depth = redis.call('LLEN', target)
if tonumber(ARGV[9]) >= 0 and depth > tonumber(ARGV[9]) then return {'queue_full', depth} end
if ARGV[11] == '1' then
  local n = tonumber(ARGV[13])
  for i = 19, 18 + 2 * n, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
  for i = 19 + 2 * n, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
end
redis.call('RPUSH', KEYS[2], ARGV[3])
local cap = tonumber(ARGV[7])
if cap > 0 then
  local n = redis.call('LLEN', KEYS[2])
  if n > cap then
    redis.call('LTRIM', KEYS[2], n - cap, -1)
    redis.call('HINCRBY', KEYS[1], 'trimmed', n - cap)
  end
end
redis.call('HSET', KEYS[3], 'status', 'queued', 'attempt', 0, 'lost', 0, 'conversation', ARGV[2],
           'conv_key', KEYS[1], 'model', ARGV[10], 'queue', target, 'home', KEYS[4], 'user_message', ARGV[3],
           'message', ARGV[5], 'enqueued_at', ARGV[4], 'queued_at', now)
redis.call('HSET', KEYS[1], 'busy', ARGV[1], 'turn', ARGV[1])
if tonumber(ARGV[12]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[12])
  redis.call('EXPIRE', KEYS[2], ARGV[12])
end
redis.call('LPUSH', target, ARGV[5])
-- In the same step: the watchdogs now know this worker's queue may hold a turn (worker/own_queue.py).
if chosen then redis.call('SADD', KEYS[8], chosen) end
redis.call('ZADD', KEYS[5], now, ARGV[1])
return {'ok', depth + 1, target}
"""

CANCEL = PRELUDE + """
-- KEYS: turn, stream, running, queued   ARGV: turn id, result json, message json, finished_at, maxlen,
--                                              stream ttl, result ttl
local s = redis.call('HMGET', KEYS[1], 'status', 'conv_key', 'queue', 'message')
if not s[1] then return 'missing' end
if s[1] == 'done' or s[1] == 'failed' then return 'finished' end
redis.call('HSET', KEYS[1], 'cancel', 1)
if s[1] == 'running' then
  local exp = redis.call('ZSCORE', KEYS[3], ARGV[1])
  if exp and tonumber(exp) > now_s() then return 'requested' end  -- its worker stops at the next step
end
-- No worker holds it: it ends here, with the empty reply a cancel before the first token gives, and its
-- message leaves the queue (a copy kombu put back, if any, is skipped by the worker that pops it).
if s[3] and s[4] then redis.call('LREM', s[3], 1, s[4]) end
if s[2] and redis.call('EXISTS', s[2]) == 1 then
  redis.call('RPUSH', s[2] .. ':messages', ARGV[3])
  if redis.call('HGET', s[2], 'busy') == ARGV[1] then redis.call('HDEL', s[2], 'busy') end
end
redis.call('HSET', KEYS[1], 'status', 'done', 'result', ARGV[2], 'finished_at', ARGV[4])
redis.call('HDEL', KEYS[1], 'message')
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'ev', 'done', 'a', 0, 'result', ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('EXPIRE', KEYS[1], ARGV[7])
return 'cancelled'
"""

DELETE = PRELUDE + """
-- KEYS: conv, messages, running, queued   ARGV: turn key prefix, finished_at, maxlen, stream ttl, result ttl
local busy = redis.call('HGET', KEYS[1], 'busy')
redis.call('DEL', KEYS[1], KEYS[2])
if busy then
  local turn = ARGV[1] .. busy
  local st = redis.call('HGET', turn, 'status')
  local exp = redis.call('ZSCORE', KEYS[3], busy)
  if st == 'running' and exp and tonumber(exp) > now_s() then
    redis.call('HSET', turn, 'cancel', 1)  -- its worker stops; its commit writes nothing for a deleted one
  elseif st == 'queued' or st == 'running' then
    local q = redis.call('HMGET', turn, 'queue', 'message')
    if q[1] and q[2] then redis.call('LREM', q[1], 1, q[2]) end
    fail_turn(turn, busy, 'the conversation was deleted', 0, ARGV[2], ARGV[3], ARGV[4], ARGV[5], KEYS[3], KEYS[4])
  end
end
return 1
"""


# A turn whose START reply was lost may exist: if it is still queued, end it (the user message goes back out)
# so that the caller's retry, after the error it was given, never makes a second reply. A turn a worker has
# claimed already (or that has ended) cannot be taken back: it was created and goes on, and the caller is told
# so (its reply will come; an error would have it send the message again, and that turn would be answered
# besides). Run twice (a lost reply), it answers the same: a turn failed with this very reason was withdrawn.
WITHDRAW = PRELUDE + """
-- KEYS: turn, running, queued   ARGV: turn id, reason, finished_at, maxlen, stream ttl, result ttl
local s = redis.call('HMGET', KEYS[1], 'status', 'queue', 'message', 'error')
if not s[1] then return {'missing'} end
if s[1] == 'failed' and s[4] == ARGV[2] then return {'withdrawn'} end
if s[1] ~= 'queued' then return {'started', s[2] or ''} end
if s[2] and s[3] then redis.call('LREM', s[2], 1, s[3]) end
fail_turn(KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], ARGV[4], ARGV[5], ARGV[6], KEYS[2], KEYS[3])
return {'withdrawn'}
"""


class Started(str, Enum):
    """What START says."""

    ok = "ok"
    exists = "exists"  # this turn id was started already (a retried call): nothing more done
    conflict = "conflict"  # the new conversation's id exists
    missing = "missing"  # no such conversation
    busy = "busy"  # a turn of this conversation is in flight
    changed = "changed"  # a turn went by since the history was read: read it again
    no_worker = "no_worker"  # no live worker serves the model
    queue_full = "queue_full"  # the model's queue holds the configured maximum


class Withdrawn(str, Enum):
    """What WITHDRAW says about a turn whose START reply was lost."""

    withdrawn = "withdrawn"  # it was queued: it is failed now, its user message taken back out
    missing = "missing"  # no such turn: START did not run (or a failover took it back)
    started = "started"  # a worker claimed it, or it ended: it was created and goes on


@dataclass(frozen=True)
class WithdrawReply:
    status: Withdrawn
    queue: str = ""  # started: the queue it was last on


@dataclass(frozen=True)
class StartReply:
    status: Started
    position: int = 0  # 1 = served next (ok); the depth (queue_full)
    busy_turn: str | None = None
    queue: str | None = None  # the queue the turn went to (ok): a worker's own or the model's shared one


@dataclass
class Conversation:
    id: str
    model: str
    system: str | None
    owner: str
    busy: str | None  # the turn in flight
    turn: str | None = None  # the last turn started
    trimmed: int = 0  # oldest messages dropped from the store by the history cap
    worker: str | None = None  # the worker that answered its last turn (holds its KV cache)


@dataclass(frozen=True)
class History:
    """A conversation with the newest part of its stored messages."""

    conversation: Conversation
    total: int  # messages stored
    tail: list[ChatMessage]  # the newest min(total, n) of them, oldest first


@dataclass
class TurnState:
    id: str
    conversation_id: str
    status: TurnStatus
    attempt: int
    result: TurnResult | None
    error: str | None
    enqueued_at: float
    model: str = ""
    fields: dict[str, str] | None = None  # the raw record (worker, started_at, finished_at, ...)


def new_id() -> str:
    return uuid.uuid4().hex


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


class ConversationStore:
    def __init__(self, r: redis.Redis, keys: Keys, *, max_message_chars: int = 16_000,
                 stream_maxlen: int = 10_000, stream_ttl_s: int = 3600, result_ttl_s: int = 86_400,
                 replication: Replication | None = None):
        self.r = r
        self.replication = replication or Replication()  # a turn's creation waits for replicas
        self.keys = keys
        self.max_chars = max_message_chars
        self.maxlen, self.stream_ttl, self.result_ttl = stream_maxlen, stream_ttl_s, result_ttl_s
        self._start = r.register_script(START)
        self._cancel = r.register_script(CANCEL)
        self._delete = r.register_script(DELETE)
        self._withdraw = r.register_script(WITHDRAW)

    # -- validation --------------------------------------------------------------------------------
    def check_text(self, text: object, what: str) -> str:
        """What a person typed: a non-empty string within the length limit, no control characters."""
        if not isinstance(text, str):
            raise InvalidInput(f"{what}: must be a string", what)
        if is_blank(text):
            raise InvalidInput(f"{what}: must not be empty", what)
        if len(text) > self.max_chars:
            raise InvalidInput(f"{what}: {len(text)} characters exceeds the limit of {self.max_chars}", what)
        try:
            return check_text(text, field=what)
        except ValueError as e:
            raise InvalidInput(str(e), what) from None

    def _conv_key(self, cid: str) -> str:
        try:
            return self.keys.conv(cid)
        except ValueError as e:
            raise InvalidInput(str(e), "conversation_id") from None

    # -- conversations -----------------------------------------------------------------------------
    def conversation_fields(self, model: str, system: str | None, owner: str) -> dict[str, str]:
        fields = {"model": model, "owner": owner, "created": repr(time.time())}
        if system is not None:
            fields["system"] = self.check_text(system, "system")
        return fields

    def create(self, model: str, system: str | None = None, owner: str = "") -> str:
        fields = self.conversation_fields(model, system, owner)
        cid = new_id()
        self.r.hset(self.keys.conv(cid), mapping=fields)
        return cid

    @staticmethod
    def _conversation(cid: str, raw: dict[bytes, bytes]) -> Conversation:
        h = {_s(k): _s(v) for k, v in raw.items()}
        if "model" not in h:
            raise NotFound(f"conversation {cid!r} not found")
        return Conversation(cid, h["model"], h.get("system"), h.get("owner", ""), h.get("busy"), h.get("turn"),
                            int(h.get("trimmed", 0)), h.get("worker"))

    def get(self, cid: str) -> Conversation:
        return self._conversation(cid, self.r.hgetall(self._conv_key(cid)))

    def history(self, cid: str, n: int) -> History:
        """The conversation and its newest `n` messages, read in one round trip."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hgetall(self._conv_key(cid))
        pipe.llen(self.keys.messages(cid))
        pipe.lrange(self.keys.messages(cid), -n, -1)
        raw, total, tail = pipe.execute()
        conv = self._conversation(cid, raw)
        return History(conv, int(total), [ChatMessage.model_validate_json(m) for m in tail])

    def messages(self, cid: str) -> list[ChatMessage]:
        self.get(cid)
        return [ChatMessage.model_validate_json(m) for m in self.r.lrange(self.keys.messages(cid), 0, -1)]

    def delete(self, cid: str) -> None:
        """Delete the conversation; a turn in flight is stopped and writes nothing for it afterwards."""
        key = self._conv_key(cid)
        self.get(cid)
        self._delete(keys=[key, self.keys.messages(cid), self.keys.running, self.keys.queued],
                     args=[self.keys.turn_prefix, time.time(), self.maxlen, self.stream_ttl, self.result_ttl])

    # -- turns -------------------------------------------------------------------------------------
    def start(
        self,
        *,
        turn_id: str,
        conversation_id: str,
        model: str,
        queue: str,
        user: ChatMessage,
        task_message: str,
        enqueued_at: float,
        expect_turn: str | None,
        history_cap: int,
        require_live: bool,
        max_queue_depth: int,
        create: dict[str, str] | None = None,
        ttl_s: int = 0,
        earlier: list[ChatMessage] | None = None,
        worker_queue_prefix: str | None = None,
        preferred_worker: str | None = None,
        max_backlog: int = 0,
        announced_on: str | None = None,
    ) -> StartReply:
        """Store the user message, create the turn and queue it, atomically (see START above). `queue`: the
        model's shared queue, the turn's home. With `worker_queue_prefix` (config/celery.py worker_queue(...,
        "")) the turn goes instead to the own queue of the worker that answered the conversation's last turn
        (else `preferred_worker`) when that worker is live and its queue holds fewer than `max_backlog`.
        `announced_on`: the queue the turn was announced on (shared/arrivals.py; default `queue`).
        Raises redis.RedisError."""
        args: list[object] = [
            turn_id, conversation_id, user.model_dump_json(), enqueued_at, task_message, expect_turn or "",
            history_cap, int(require_live), max_queue_depth, model, int(create is not None), ttl_s,
            len(create or {}), self.keys.turn_prefix, int(worker_queue_prefix is not None), preferred_worker or "",
            worker_queue_prefix or "", max_backlog,
        ]
        for field, value in (create or {}).items():
            args += [field, value]
        args += [m.model_dump_json() for m in earlier or []]
        out = self.replication.run(
            self.r, self._start,
            [self.keys.conv(conversation_id), self.keys.messages(conversation_id), self.keys.turn(turn_id),
             queue, self.keys.queued, self.keys.live(model), self.keys.arriving(announced_on or queue),
             self.keys.routed(model)],
            args,
        )
        status = Started(_s(out[0]))
        if status is Started.busy:
            return StartReply(status, busy_turn=_s(out[1]))
        return StartReply(status, int(out[1]) if len(out) > 1 else 0, queue=_s(out[2]) if len(out) > 2 else None)

    def turn(self, tid: str) -> TurnState:
        try:
            key = self.keys.turn(check_id(tid, "turn_id"))
        except ValueError as e:
            raise InvalidInput(str(e), "turn_id") from None
        h = {_s(k): _s(v) for k, v in self.r.hgetall(key).items()}
        if "status" not in h:
            raise NotFound(f"turn {tid!r} not found")
        result = TurnResult.model_validate_json(h["result"]) if "result" in h else None
        h.pop("message", None)
        return TurnState(
            tid,
            h.get("conversation", ""),
            TurnStatus(h["status"]),
            int(h.get("attempt", 0)),
            result,
            h.get("error"),
            float(h.get("enqueued_at", 0)),
            h.get("model", ""),
            h,
        )

    def cancel(self, tid: str) -> str:
        """Stop the turn: 'requested' (its worker stops at the next step and keeps the partial reply),
        'cancelled' (no worker held it: it ended now with an empty reply), or 'finished' (nothing to do)."""
        st = self.turn(tid)
        if st.status.finished:
            return "finished"
        result = TurnResult(turn_id=tid, conversation_id=st.conversation_id, text="",
                            finish_reason=FinishReason.cancelled, prompt_tokens=0, completion_tokens=0, attempt=0)
        message = ChatMessage(role=Role.assistant, text="", turn_id=tid)
        return _s(self._cancel(
            keys=[self.keys.turn(tid), self.keys.stream(tid), self.keys.running, self.keys.queued],
            args=[tid, result.model_dump_json(), message.model_dump_json(), time.time(), self.maxlen,
                  self.stream_ttl, self.result_ttl],
        ))

    def withdraw(self, tid: str, reason: str) -> WithdrawReply:
        """End the turn if it is still queued (see WITHDRAW), waiting for replicas as START did (a failover
        must not bring back a turn whose caller was told it was not started). Raises redis.RedisError."""
        out = self.replication.run(
            self.r, self._withdraw, [self.keys.turn(tid), self.keys.running, self.keys.queued],
            [tid, reason, time.time(), self.maxlen, self.stream_ttl, self.result_ttl])
        return WithdrawReply(Withdrawn(_s(out[0])), _s(out[1]) if len(out) > 1 else "")

    def dead_letters(self) -> list[dict]:
        return [json.loads(x) for x in self.r.lrange(self.keys.dead, 0, -1)]
