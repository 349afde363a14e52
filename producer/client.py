"""The producer API: create conversations, send user turns, read replies as they stream.

client = ChatClient(settings)
cid = client.create_conversation("smollm2-135m", system="Be brief.")
task = client.send(cid, "What is the capital of France?", SamplingParams(temperature=0))
for ev in client.events(task.turn_id): ...        # start / delta / done / error
result = client.wait(task.turn_id)                # or just the final TurnResult
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import redis

from config.celery import GENERATE_TASK, make_celery, queue_name
from config.presets import load_presets
from config.settings import Settings
from producer.store import ConversationStore
from shared.errors import NotFound, TurnFailed, Unavailable
from shared.keys import Keys
from shared.sampling import SamplingParams
from shared.wire import GenerateTask, TurnResult


@dataclass
class StreamEvent:
    id: str
    kind: str  # start (an attempt begins: reset what was shown) | delta | done | error
    attempt: int
    text: str = ""
    result: TurnResult | None = None
    error: str | None = None


def _parse(entry_id: bytes, fields: dict[bytes, bytes]) -> StreamEvent:
    f = {k.decode(): v.decode() for k, v in fields.items()}
    kind = f.get("ev", "delta")
    result = TurnResult.model_validate_json(f["result"]) if "result" in f else None
    return StreamEvent(entry_id.decode(), kind, int(f.get("a", 0)), f.get("t", ""), result, f.get("error"))


TERMINAL = ("done", "error")


def stream_events(resp: list | None) -> Iterator[StreamEvent]:
    """The events of an XREAD reply, in order."""
    for _, entries in resp or []:
        for entry_id, fields in entries:
            yield _parse(entry_id, fields)


class ChatClient:
    def __init__(self, settings: Settings, r: redis.Redis | None = None):
        self.settings = settings
        self.r = r or redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5, health_check_interval=30)
        self.keys = Keys(settings.key_prefix)
        self.store = ConversationStore(self.r, self.keys, max_message_chars=settings.max_message_chars)
        self.celery = make_celery(settings, name="chat-producer")

    def models(self) -> set[str]:
        """Preset names plus every model a worker has served on this Redis."""
        return set(load_presets().models) | {m.decode() for m in self.r.smembers(self.keys.models)}

    def create_conversation(self, model: str, system: str | None = None, owner: str = "") -> str:
        try:
            if model not in self.models():
                raise NotFound(f"unknown model {model!r}: known models are {', '.join(sorted(self.models()))}")
            return self.store.create(model, system, owner)
        except redis.ConnectionError as e:
            raise Unavailable(f"Redis unreachable: {e}") from None

    def send(self, cid: str, text: str, sampling: SamplingParams | None = None) -> GenerateTask:
        """Store the user message and enqueue the turn; on any failure nothing stays stored."""
        try:
            task = self.store.add_user_turn(cid, text, sampling or SamplingParams())
        except redis.ConnectionError as e:
            raise Unavailable(f"Redis unreachable: {e}") from None
        try:
            self.celery.send_task(
                GENERATE_TASK,
                args=[task.model_dump(mode="json")],
                task_id=task.turn_id,
                queue=queue_name(self.settings, task.model),
                # The reply comes through the turn's record and stream, never through Celery's result
                # backend. Not subscribing to it means a send while the broker is down fails in about a
                # second with the broker's error, instead of ~20 s of result-backend reconnects ending in
                # "Retry limit exceeded while trying to reconnect to the Celery result store backend".
                ignore_result=True,
                retry=True,
                retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
            )
            self.store.mark_published(task)
        except Exception as e:
            try:
                self.store.rollback_turn(task)
            except redis.RedisError:
                pass  # Redis is down: the next send on this conversation takes the turn back
            raise Unavailable(f"could not enqueue the turn: {e}") from None
        return task

    def events(self, turn_id: str, after: str = "0-0", timeout: float | None = None) -> Iterator[StreamEvent]:
        """The turn's stream from `after` (its start by default), until done or error. Survives a
        Redis restart; falls back to the turn's record when the stream has expired."""
        key = self.keys.stream(turn_id)
        end = None if timeout is None else time.monotonic() + timeout
        last = after
        st = None  # the turn's record, read only when the stream has nothing new
        while True:
            finished = st is not None and st.status in ("done", "failed")
            try:
                # Block only while the turn can still write: a finished turn's stream is read at once.
                resp = self.r.xread({key: last}, block=None if finished else 1000, count=256)
                if not resp and not finished:
                    st = self.store.turn(turn_id)
            except redis.ConnectionError:  # Redis restarting: wait it out
                time.sleep(0.5)
                continue
            for ev in stream_events(resp):
                last = ev.id
                yield ev
                if ev.kind in TERMINAL:
                    return
            if finished and not resp and st is not None:  # the stream expired or its end was read already
                if st.status == "done" and st.result is not None:
                    yield StreamEvent("", "done", st.attempt, result=st.result)
                else:
                    yield StreamEvent("", "error", st.attempt, error=st.error or "the turn failed")
                return
            if end is not None and time.monotonic() > end:
                raise TimeoutError(f"turn {turn_id} did not finish within {timeout}s")

    def wait(
        self, turn_id: str, timeout: float | None = None, on_event: Callable[[StreamEvent], None] | None = None
    ) -> TurnResult:
        for ev in self.events(turn_id, timeout=timeout):
            if on_event:
                on_event(ev)
            if ev.kind == "done" and ev.result is not None:
                return ev.result
            if ev.kind == "error":
                raise TurnFailed(ev.error or "the turn failed")
        raise TurnFailed("the turn's stream ended without a result")

    def ask(
        self,
        cid: str,
        text: str,
        sampling: SamplingParams | None = None,
        timeout: float | None = None,
        on_event: Callable[[StreamEvent], None] | None = None,
    ) -> TurnResult:
        task = self.send(cid, text, sampling)
        return self.wait(task.turn_id, timeout, on_event)

    def close(self) -> None:
        self.celery.close()
        self.r.close()
