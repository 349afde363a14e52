"""Conversation state in Redis (layout: shared/keys.py). Nothing lives in the producer process,
so a producer restart loses nothing. Each change is one Lua script, so nothing is stored half-way."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

import redis

from shared.errors import Busy, InvalidInput, NotFound
from shared.keys import Keys, check_id
from shared.messages import ChatMessage, Role, check_text
from shared.sampling import SamplingParams
from shared.wire import GenerateTask, TurnResult

ADD_TURN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
local busy = redis.call('HGET', KEYS[1], 'busy')
if busy then
  local t = redis.call('HMGET', ARGV[4] .. busy, 'status', 'published', 'enqueued_at', 'user_message')
  if t[1] == 'queued' and t[2] ~= '1' and tonumber(ARGV[3]) - tonumber(t[3]) > tonumber(ARGV[6]) then
    -- a producer died between storing this turn and enqueueing it: nobody will answer it
    redis.call('LREM', KEYS[2], -1, t[4])
    redis.call('DEL', ARGV[4] .. busy)
  elseif t[1] == 'queued' or t[1] == 'running' then
    return {'busy', busy}
  end
end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[3], 'status', 'queued', 'attempt', 0, 'conversation', ARGV[5], 'conv_key', KEYS[1],
           'user_message', ARGV[1], 'enqueued_at', ARGV[3])
redis.call('HSET', KEYS[1], 'busy', ARGV[2], 'turn', ARGV[2])
return {'ok', unpack(redis.call('LRANGE', KEYS[2], 0, -1))}
"""

UNPUBLISHED_GRACE_S = 30  # a queued turn never published after this long is taken back

ROLLBACK = """
if redis.call('HGET', KEYS[3], 'status') ~= 'queued' then return 0 end
redis.call('LREM', KEYS[2], -1, redis.call('HGET', KEYS[3], 'user_message'))
redis.call('DEL', KEYS[3])
if redis.call('HGET', KEYS[1], 'busy') == ARGV[1] then redis.call('HDEL', KEYS[1], 'busy') end
return 1
"""


@dataclass
class Conversation:
    id: str
    model: str
    system: str | None
    owner: str
    busy: str | None  # the turn in flight


@dataclass
class TurnState:
    id: str
    conversation_id: str
    status: str  # queued | running | done | failed
    attempt: int
    result: TurnResult | None
    error: str | None
    enqueued_at: float


def new_id() -> str:
    return uuid.uuid4().hex


class ConversationStore:
    def __init__(self, r: redis.Redis, keys: Keys, *, max_message_chars: int = 16_000):
        self.r = r
        self.keys = keys
        self.max_chars = max_message_chars
        self._add = r.register_script(ADD_TURN)
        self._rollback = r.register_script(ROLLBACK)

    # -- validation --------------------------------------------------------------------------------
    def check_text(self, text: object, what: str) -> str:
        if not isinstance(text, str):
            raise InvalidInput(f"{what}: must be a string")
        if not text.strip():
            raise InvalidInput(f"{what}: must not be empty")
        if len(text) > self.max_chars:
            raise InvalidInput(f"{what}: {len(text)} characters exceeds the limit of {self.max_chars}")
        try:
            return check_text(text, field=what)
        except ValueError as e:
            raise InvalidInput(str(e)) from None

    # -- conversations -----------------------------------------------------------------------------
    def create(self, model: str, system: str | None = None, owner: str = "") -> str:
        if system is not None:
            system = self.check_text(system, "system")
        cid = new_id()
        fields = {"model": model, "owner": owner, "created": time.time()}
        if system is not None:
            fields["system"] = system
        self.r.hset(self.keys.conv(cid), mapping=fields)
        return cid

    def get(self, cid: str) -> Conversation:
        try:
            key = self.keys.conv(cid)
        except ValueError as e:
            raise InvalidInput(str(e)) from None
        h = {k.decode(): v.decode() for k, v in self.r.hgetall(key).items()}
        if not h:
            raise NotFound(f"conversation {cid!r} not found")
        return Conversation(cid, h["model"], h.get("system"), h.get("owner", ""), h.get("busy"))

    def messages(self, cid: str) -> list[ChatMessage]:
        self.get(cid)
        return [ChatMessage.model_validate_json(m) for m in self.r.lrange(self.keys.messages(cid), 0, -1)]

    def delete(self, cid: str) -> None:
        self.get(cid)
        self.r.delete(self.keys.conv(cid), self.keys.messages(cid))

    # -- turns -------------------------------------------------------------------------------------
    def add_user_turn(self, cid: str, text: str, sampling: SamplingParams) -> GenerateTask:
        """Append the user message and create the queued turn; returns the payload to enqueue."""
        conv = self.get(cid)
        text = self.check_text(text, "message")
        tid = new_id()
        now = time.time()
        user = ChatMessage(role=Role.prompter, text=text)
        out = self._add(
            keys=[self.keys.conv(cid), self.keys.messages(cid), self.keys.turn(tid)],
            args=[user.model_dump_json(), tid, now, f"{self.keys.prefix}:turn:", cid, UNPUBLISHED_GRACE_S],
        )
        status = out[0].decode() if isinstance(out[0], bytes) else out[0]
        if status == "missing":
            raise NotFound(f"conversation {cid!r} not found")
        if status == "busy":
            raise Busy(f"conversation {cid!r} already has a turn in flight ({out[1].decode()})")
        history = [ChatMessage.model_validate_json(m) for m in out[1:]]
        head = [ChatMessage(role=Role.system, text=conv.system)] if conv.system else []
        return GenerateTask(
            turn_id=tid,
            conversation_id=cid,
            model=conv.model,
            messages=head + history,
            sampling=sampling,
            enqueued_at=now,
        )

    def mark_published(self, task: GenerateTask) -> None:
        self.r.hset(self.keys.turn(task.turn_id), "published", 1)

    def rollback_turn(self, task: GenerateTask) -> None:
        """Undo add_user_turn when the turn could not be enqueued."""
        self._rollback(
            keys=[
                self.keys.conv(task.conversation_id),
                self.keys.messages(task.conversation_id),
                self.keys.turn(task.turn_id),
            ],
            args=[task.turn_id],
        )

    def turn(self, tid: str) -> TurnState:
        try:
            key = self.keys.turn(check_id(tid, "turn_id"))
        except ValueError as e:
            raise InvalidInput(str(e)) from None
        h = {k.decode(): v.decode() for k, v in self.r.hgetall(key).items()}
        if not h:
            raise NotFound(f"turn {tid!r} not found")
        result = TurnResult.model_validate_json(h["result"]) if "result" in h else None
        return TurnState(
            tid,
            h.get("conversation", ""),
            h["status"],
            int(h.get("attempt", 0)),
            result,
            h.get("error"),
            float(h.get("enqueued_at", 0)),
        )

    def cancel(self, tid: str) -> None:
        """Ask the worker to stop the turn at its next step; the partial reply is committed."""
        self.turn(tid)
        self.r.hset(self.keys.turn(tid), "cancel", 1)

    def dead_letters(self) -> list[dict]:
        return [json.loads(x) for x in self.r.lrange(self.keys.dead, 0, -1)]
