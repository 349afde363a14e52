"""What the routes share: the producer client (every turn starts through its `start_turn`), the asyncio
Redis client for reading turns, ownership checks, queue depths and positions, and the shutdown signal."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import redis
import redis.asyncio as aredis

from config.celery import queue_name, worker_queue
from config.redis_clients import async_client
from producer.api.config import ApiSettings
from producer.api.errors import ApiError
from producer.api.metrics import Metrics
from producer.cards import describe
from producer.client import POSITION, ChatClient, StartedTurn, TurnRequest
from producer.reader import StreamEvent, afollow
from producer.store import Conversation, TurnState
from shared.errors import NotFound, Unavailable


@dataclass
class TurnView:
    state: TurnState
    fields: dict[str, str]  # the raw turn hash (worker, started_at, finished_at, ...)


class ChatService:
    def __init__(self, settings: ApiSettings, metrics: Metrics):
        self.settings = settings
        self.client = ChatClient(settings)
        self.r: redis.Redis = self.client.r
        self.ar: aredis.Redis = async_client(settings.redis_url, **settings.redis_options())
        self.keys = self.client.keys
        self.store = self.client.store
        self.catalog = self.client.catalog
        self.metrics = metrics
        self._aposition = self.ar.register_script(POSITION)
        # Set when the process is asked to stop: streams send their last event, waiting requests answer.
        self.draining = asyncio.Event()

    async def aclose(self) -> None:
        await self.ar.aclose()
        self.client.close()

    # -- queues ------------------------------------------------------------------------------------
    def queue_depth(self, model: str) -> int:
        """Turns of `model` waiting on a queue: its shared queue plus the own queues of the workers turns were
        routed to (`{p}:routed:{model}`). Raises redis.RedisError."""
        names = sorted(n.decode(errors="replace") for n in self.r.smembers(self.keys.routed(model)))
        pipe = self.r.pipeline(transaction=False)
        for q in [queue_name(self.settings, model), *(worker_queue(self.settings, model, n) for n in names)]:
            pipe.llen(q)
        return sum(int(n) for n in pipe.execute())

    async def aqueue_position(self, queue: str, turn_id: str) -> int:
        return int(await self._aposition(keys=[queue], args=[turn_id]))

    def follow(self, turn_id: str, after: str = "0-0") -> AsyncIterator[StreamEvent | None]:
        """The turn's events (producer/reader.py afollow): every route reads a turn this way, so an end is
        reported once the replicas hold it (CHAT_REDIS_WAIT_REPLICAS) and an outage is waited out alike."""
        return afollow(self.ar, self.keys, turn_id, self.aqueue_position, after,
                       outage_s=self.settings.redis_outage_s, replication=self.store.replication)

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
        return TurnView(state, state.fields or {})

    def check_model(self, model: str) -> None:
        known = self.catalog.known()
        if model not in known:
            raise ApiError(404, f"unknown model {model!r}: known models are {', '.join(sorted(known))}",
                           param="model", code="model_not_found")

    # -- turns -------------------------------------------------------------------------------------
    def start(self, req: TurnRequest) -> StartedTurn:
        """Start a turn (producer.client.ChatClient.start_turn) under this API's admission limit."""
        try:
            turn = self.client.start_turn(replace(req, max_queue_depth=self.settings.max_queue_depth))
        except Unavailable as e:
            self.metrics.rejected.labels(e.code or "unavailable").inc()
            e.retry_after_s = self.settings.retry_after_s
            raise
        if self.metrics.tracker is not None:
            self.metrics.tracker.track(turn.turn_id, turn.model)
        return turn

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

    def models(self, served_only: bool = False) -> list[dict[str, Any]]:
        out = []
        for m in sorted(self.catalog.known()):
            info = self.catalog.info(m)
            if served_only and not info.served:
                continue
            out.append({**describe(info), "queue_depth": self.queue_depth(m)})
        return out
