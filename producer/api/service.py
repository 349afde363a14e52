"""What the routes share: the producer client, ownership checks, admission and queue positions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aredis

from config.celery import queue_name
from producer.api.config import ApiSettings
from producer.api.errors import ApiError
from producer.api.metrics import Metrics
from producer.client import ChatClient
from producer.store import Conversation, TurnState
from shared.errors import NotFound
from shared.messages import ChatMessage
from shared.sampling import SamplingParams
from shared.wire import GenerateTask

# kombu's Redis transport keeps a queue as a list (LPUSH in, BRPOP out: the right end is served next),
# plus one list per priority step. Position 1 = served next; 0 = not waiting (a worker holds it).
PRIORITY_SUFFIXES = ["", "\x06\x163", "\x06\x166", "\x06\x169"]
POSITION = """
local n = 0
for _, q in ipairs(KEYS) do
  local items = redis.call('LRANGE', q, 0, -1)
  for i = #items, 1, -1 do
    n = n + 1
    if string.find(items[i], ARGV[1], 1, true) then return n end
  end
end
return 0
"""


@dataclass
class TurnView:
    state: TurnState
    fields: dict[str, str]  # the raw turn hash (worker, started_at, finished_at, ...)


class ChatService:
    def __init__(self, settings: ApiSettings, metrics: Metrics):
        self.settings = settings
        self.client = ChatClient(settings)
        self.r: redis.Redis = self.client.r
        self.ar: aredis.Redis = aredis.Redis.from_url(settings.redis_url, socket_connect_timeout=5)
        self.keys = self.client.keys
        self.store = self.client.store
        self.metrics = metrics
        self._position = self.r.register_script(POSITION)
        self._aposition = self.ar.register_script(POSITION)

    async def aclose(self) -> None:
        await self.ar.aclose()
        self.client.close()

    # -- queues ------------------------------------------------------------------------------------
    def queue_keys(self, model: str) -> list[str]:
        q = queue_name(self.settings, model)
        return [q + s for s in PRIORITY_SUFFIXES]

    def queue_depth(self, model: str) -> int:
        pipe = self.r.pipeline(transaction=False)
        for k in self.queue_keys(model):
            pipe.llen(k)
        return int(sum(pipe.execute()))

    def queue_position(self, model: str, turn_id: str) -> int:
        return int(self._position(keys=self.queue_keys(model), args=[turn_id]))

    async def aqueue_position(self, model: str, turn_id: str) -> int:
        return int(await self._aposition(keys=self.queue_keys(model), args=[turn_id]))

    def admit(self, model: str) -> None:
        depth = self.queue_depth(model)
        if depth > self.settings.max_queue_depth:
            self.metrics.rejected.labels("queue_full").inc()
            raise ApiError(
                503,
                f"model {model!r} is overloaded: {depth} turns queued (limit {self.settings.max_queue_depth})",
                code="queue_full",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )

    # -- ownership ---------------------------------------------------------------------------------
    def conversation(self, owner: str, cid: str) -> Conversation:
        """The caller's conversation; another caller's is reported exactly like a missing one."""
        conv = self.store.get(cid)
        if conv.owner != owner:
            raise NotFound(f"conversation {cid!r} not found")
        return conv

    def turn(self, owner: str, cid: str, tid: str) -> TurnView:
        self.conversation(owner, cid)
        state = self.store.turn(tid)
        if state.conversation_id != cid:
            raise NotFound(f"turn {tid!r} not found")
        raw = {k.decode(): v.decode() for k, v in self.r.hgetall(self.keys.turn(tid)).items()}
        return TurnView(state, raw)

    def check_model(self, model: str) -> None:
        if model not in self.client.models():
            known = ", ".join(sorted(self.client.models()))
            raise ApiError(404, f"unknown model {model!r}: known models are {known}", param="model",
                           code="model_not_found")

    # -- turns -------------------------------------------------------------------------------------
    def send(self, owner: str, cid: str, text: str, sampling: SamplingParams) -> tuple[GenerateTask, int]:
        conv = self.conversation(owner, cid)
        self.admit(conv.model)
        task = self.client.send(cid, text, sampling)
        if self.metrics.tracker is not None:
            self.metrics.tracker.track(task.turn_id, task.model)
        return task, self.queue_position(task.model, task.turn_id)

    def create_with_history(self, owner: str, model: str, system: str | None, history: list[ChatMessage]) -> str:
        """A conversation holding earlier messages (an OpenAI request's), expiring after a while."""
        cid = self.client.create_conversation(model, system, owner)
        ttl = self.settings.openai_conversation_ttl_s
        pipe = self.r.pipeline()
        if history:
            pipe.rpush(self.keys.messages(cid), *[m.model_dump_json() for m in history])
            pipe.expire(self.keys.messages(cid), ttl)
        pipe.expire(self.keys.conv(cid), ttl)
        pipe.execute()
        return cid

    def partial_reply(self, tid: str) -> str:
        """What the turn's current attempt has streamed so far."""
        text = ""
        for _, fields in self.r.xrange(self.keys.stream(tid), count=100_000):
            f: dict[Any, Any] = fields
            if f.get(b"ev") == b"start":
                text = ""
            elif b"t" in f:
                text += f[b"t"].decode()
        return text

    def models(self) -> list[dict[str, Any]]:
        served = {m.decode() for m in self.r.smembers(self.keys.models)}
        return [
            {"id": m, "served": m in served, "queue_depth": self.queue_depth(m)} for m in sorted(self.client.models())
        ]
