"""The producer API: create conversations, start turns, read replies as they stream.

    client = ChatClient(settings)
    cid = client.create_conversation("smollm2-135m", system="Be brief.")
    turn = client.send(cid, "What is the capital of France?", SamplingParams(temperature=0))
    for ev in client.events(turn.turn_id): ...     # queued / start / delta / done / error
    result = client.wait(turn.turn_id)             # or just the final TurnResult

Every way a turn starts (this library, the CLI, both HTTP routes) goes through `start_turn`: check the
text once, fit the conversation into the model's context with the tokenizer its workers published (so
every rejection a worker would make for the request's sake comes here first, before anything is
stored), then one Lua script stores the user message, creates the turn and queues its task message.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import redis

from config.celery import queue_name, worker_queue
from config.redis_clients import sync_client
from config.settings import Settings
from producer.cards import ModelCatalog, ModelInfo
from producer.reader import TERMINAL, EventKind, StreamEvent, follow
from producer.routing import opening, rendezvous
from producer.store import ConversationStore, Started, Withdrawn, WithdrawReply, new_id
from shared.arrivals import Arrivals
from shared.context import ContextLengthExceeded, fit_raw, fit_turn
from shared.errors import Busy, InvalidInput, NotFound, TurnFailed, Unavailable
from shared.keys import Keys, check_id
from shared.messages import ChatMessage, Role
from shared.sampling import SamplingParams
from shared.task_message import MAX_ITEM_BYTES, generate_message
from shared.wire import MAX_PAYLOAD_BYTES, GenerateTask, TurnResult

FIRST_READ = 64  # messages of history read first; more (x4) only while everything read still fits
UNCHECKED_PAYLOAD_BYTES = MAX_PAYLOAD_BYTES // 2  # history sent when no tokenizer is known to fit it ...
UNCHECKED_MESSAGES = 4096  # ... in at most this many messages
POSITION = """
-- KEYS[1] = the queue the turn is on (its record's `queue`: a worker's own or the model's shared one;
-- kombu: LPUSH in, BRPOP out, so the right end is served next)
local items = redis.call('LRANGE', KEYS[1], 0, -1)
for i = #items, 1, -1 do
  if string.find(items[i], ARGV[1], 1, true) then return #items - i + 1 end
end
return 0
"""


@dataclass(frozen=True)
class TurnRequest:
    """A user turn to start, in an existing conversation or in a new one holding `history`."""

    text: str
    sampling: SamplingParams = field(default_factory=SamplingParams)
    conversation_id: str | None = None
    owner: str | None = None  # when set, the conversation must belong to this caller (else NotFound)
    # A new conversation (conversation_id None): its model, system prompt and earlier messages.
    model: str | None = None
    system: str | None = None
    history: tuple[ChatMessage, ...] = ()
    ttl_s: int = 0  # it expires this long after the turn starts (0 = kept)
    truncate: bool = True  # may the oldest turns be dropped to fit the context? (False: OpenAI's rule)
    max_queue_depth: int | None = None  # refuse while the model's queue holds more than this (None = no limit)
    deadline: float | None = None  # unix time after which generation stops (finish_reason cancelled)
    text_field: str = "message"  # how errors about `text` name it
    raw: bool = False  # `text` is a whole raw prompt (/v1/completions: no template, no system, no history)
    tools_prompt: str | None = None  # shown after the system prompt for this turn only (api/tools.py)
    grammar_field: str = "grammar"  # how errors about sampling.grammar name it (response_format, tool_choice, ...)


@dataclass(frozen=True)
class StartedTurn:
    turn_id: str
    conversation_id: str
    model: str
    position: int  # in the queue, 1 = served next
    dropped_messages: int = 0  # oldest messages the model will not see
    truncated_tokens: int = 0  # cut from the start of the newest message, too long for the context alone
    prompt_tokens: int | None = None  # when the model's tokenizer is known here
    payload_bytes: int = 0  # the task message's size on the queue (bounded by the context, not the history)
    enqueued_at: float = 0.0  # unix time the turn was queued
    queue: str = ""  # the queue it went to: a worker's own (cache-aware routing) or the model's shared one


class ChatClient:
    def __init__(self, settings: Settings, r: redis.Redis | None = None):
        self.settings = settings
        self.r = r or sync_client(settings.redis_url, **settings.redis_options())
        self.keys = Keys(settings.key_prefix)
        self.store = ConversationStore(self.r, self.keys, max_message_chars=settings.max_message_chars,
                                       stream_maxlen=settings.stream_maxlen, stream_ttl_s=settings.stream_ttl_s,
                                       result_ttl_s=settings.result_ttl_s,
                                       replication=settings.replication())
        self.catalog = ModelCatalog(self.r, self.keys)
        self._position = self.r.register_script(POSITION)
        self.arrivals = Arrivals(self.r, self.keys)

    def models(self) -> set[str]:
        """Preset names plus every model a worker has served on this Redis."""
        return self.catalog.known()

    def create_conversation(self, model: str, system: str | None = None, owner: str = "") -> str:
        """A new conversation. A system prompt that leaves no room for a turn in the model's context (when
        its card is known) is refused here, not at every turn after."""
        try:
            known = self.models()
            if model not in known:
                raise NotFound(f"unknown model {model!r}: known models are {', '.join(sorted(known))}", "model",
                               "model_not_found")
            if system is not None:
                self.store.check_text(system, "system")
                info = self.catalog.info(model)
                codec = self.catalog.codec(info.card) if info.card is not None else None
                if codec is not None:
                    fit_turn(codec, [ChatMessage(role=Role.system, text=system), ChatMessage(role=Role.prompter,
                             text="?")], info.sequence_length, None)
            return self.store.create(model, system, owner)
        except redis.ConnectionError as e:
            raise Unavailable(f"Redis unreachable: {e}") from None

    def send(self, cid: str, text: str, sampling: SamplingParams | None = None, **options: object) -> StartedTurn:
        """Start the next turn of conversation `cid` (see TurnRequest for `options`)."""
        return self.start_turn(TurnRequest(text, sampling or SamplingParams(), conversation_id=cid,
                                           **options))  # type: ignore[arg-type]

    # -- the one way a turn starts -------------------------------------------------------------------
    def start_turn(self, req: TurnRequest) -> StartedTurn:
        """Check, fit and queue one turn; on any error nothing is stored (the errors name the field).
        While it is checked the turn is announced on its queue (shared/arrivals.py), so an idle worker
        popping a turn of the same burst waits for it instead of prefilling alone."""
        tid = new_id()
        announced: list[str] = []  # queues this turn was announced on
        try:
            return self._start_turn(req, tid, announced)
        except BaseException:
            for queue in announced:
                self.arrivals.withdraw(queue, tid)
            raise

    def _start_turn(self, req: TurnRequest, tid: str, announced: list[str]) -> StartedTurn:
        text = self.store.check_text(req.text, req.text_field)
        user = ChatMessage(role=Role.prompter, text=text)
        cid = new_id() if req.conversation_id is None else req.conversation_id
        create = None
        if req.conversation_id is not None:
            try:
                check_id(cid, "conversation_id")
            except ValueError as e:
                raise InvalidInput(str(e), "conversation_id") from None
        else:
            if req.model is None:
                raise InvalidInput("model: required for a new conversation", "model")
            create = self.store.conversation_fields(req.model, req.system, req.owner or "")
        n = FIRST_READ
        started = False
        for _ in range(8):  # a few rounds: more history (x4), or a turn that went by meanwhile
            try:
                last_worker = None
                if req.conversation_id is None:
                    model, system, total, earlier, expect = req.model, req.system, len(req.history), req.history, None
                else:
                    hist = self.store.history(cid, n)
                    conv = hist.conversation
                    if req.owner is not None and conv.owner != req.owner:
                        raise NotFound(f"conversation {cid!r} not found", "conversation_id")
                    model, system, total, earlier, expect = conv.model, conv.system, hist.total, hist.tail, conv.turn
                    last_worker = conv.worker
                assert model is not None
                queue = queue_name(self.settings, model)
                info = self.catalog.info(model)
                if not info.served and not self.settings.queue_without_workers:
                    raise Unavailable(
                        f"model {model!r}: no live worker serves it (start one, or set "
                        "CHAT_QUEUE_WITHOUT_WORKERS=true to queue turns for workers that start later)",
                        "model", "model_not_served")
                preferred, expected = self._route(info, last_worker, opening(system, [*earlier, user]))
                if expected not in announced:  # while it is checked, so an idle worker there waits for it
                    self.arrivals.announce(expected, tid)
                    announced.append(expected)
                shown = "\n\n".join(p for p in (system, req.tools_prompt) if p)  # this turn's system prompt
                head = [ChatMessage(role=Role.system, text=shown)] if shown else []
                kept, dropped, truncated, prompt_tokens = self._fit(info, head, list(earlier), user, req)
                if dropped == 0 and len(earlier) < total and req.conversation_id is not None and n < max(
                        FIRST_READ, info.sequence_length):
                    n *= 4  # everything read fits: older messages may fit too
                    continue
                dropped += total - len(earlier)
                while True:
                    task = GenerateTask(turn_id=tid, conversation_id=cid, model=model,
                                        messages=head + kept + [user], sampling=req.sampling,
                                        enqueued_at=time.time(), deadline=req.deadline, dropped_messages=dropped,
                                        truncate=req.truncate, raw=req.raw)
                    message = generate_message(tid, queue, task.model_dump(mode="json"))
                    if len(message) <= MAX_ITEM_BYTES:
                        break
                    if not kept or not req.truncate:  # long tokens of escaped text: rare, but bounded
                        raise ContextLengthExceeded(f"messages: the conversation is too large to queue "
                                                    f"({len(message)} bytes, at most {MAX_ITEM_BYTES})")
                    kept, dropped = kept[1:], dropped + 1
                started = True  # from here on, a lost reply may hide a created turn
                reply = self.store.start(
                    turn_id=tid, conversation_id=cid, model=model, queue=queue, user=user,
                    task_message=message, enqueued_at=task.enqueued_at, expect_turn=expect,
                    history_cap=self.settings.max_history_messages,
                    require_live=not self.settings.queue_without_workers,
                    max_queue_depth=-1 if req.max_queue_depth is None else req.max_queue_depth,
                    create=create, ttl_s=req.ttl_s, earlier=kept if create is not None else None,
                    worker_queue_prefix=worker_queue(self.settings, model, "") if self.routing else None,
                    preferred_worker=preferred, max_backlog=self.settings.route_max_backlog,
                    announced_on=expected,
                )
            except redis.RedisError as e:
                went = self._withdraw(tid, f"Redis error while starting the turn: {e}") if started else None
                if went is not None and went.status is Withdrawn.started:
                    # START ran (its reply was lost) and a worker has the turn already: it is started.
                    return StartedTurn(tid, cid, model, 0, dropped, truncated, prompt_tokens, len(message),
                                       task.enqueued_at, went.queue or queue)
                raise Unavailable(f"Redis unavailable: {e}") from None
            if reply.status in (Started.ok, Started.exists):
                return StartedTurn(tid, cid, model, reply.position, dropped, truncated, prompt_tokens, len(message),
                                   task.enqueued_at, reply.queue or queue)
            if reply.status is Started.missing:
                raise NotFound(f"conversation {cid!r} not found", "conversation_id")
            if reply.status is Started.busy:
                raise Busy(f"conversation {cid!r} already has a turn in flight ({reply.busy_turn})")
            if reply.status is Started.no_worker:
                raise Unavailable(f"model {model!r}: no live worker serves it", "model", "model_not_served")
            if reply.status is Started.queue_full:
                raise Unavailable(f"model {model!r} is overloaded: {reply.position} turns queued (limit "
                                  f"{req.max_queue_depth})", None, "queue_full")
            if reply.status is Started.conflict:
                cid = new_id()
            # changed: a turn went by since the history was read; read it again
        raise Unavailable("the conversation kept changing while this turn was being queued; try again")

    @property
    def routing(self) -> bool:
        """Whether turns may go to a worker's own queue (CHAT_ROUTING=cache_aware, a backlog limit above 0)."""
        return self.settings.routing == "cache_aware" and self.settings.route_max_backlog > 0

    def _route(self, info: ModelInfo, last_worker: str | None, opening_text: str) -> tuple[str | None, str]:
        """(the worker START should prefer when the conversation has no last worker, the queue the turn is
        expected on). START decides for itself, atomically with the liveness and backlog checks; this
        guess only picks where to announce the turn (a wrong guess costs an idle worker a hold of a few ms)."""
        shared = queue_name(self.settings, info.name)
        if not self.routing:
            return None, shared
        live = [w.name for w in info.workers if w.own_queue]  # older workers consume the shared queue only
        preferred = rendezvous(opening_text, live)
        target = last_worker or preferred
        if target is None or target not in live:
            return preferred, shared
        return preferred, worker_queue(self.settings, info.name, target)

    def _fit(self, info: ModelInfo, head: list[ChatMessage], earlier: list[ChatMessage], user: ChatMessage,
             req: TurnRequest) -> tuple[list[ChatMessage], int, int, int | None]:
        """(earlier messages kept, how many dropped, tokens truncated, prompt tokens) under the model's card;
        raises InvalidInput naming the field. Without a card the worker fits what a byte budget allows."""
        codec = self.catalog.codec(info.card) if info.card is not None else None
        if codec is None or info.card is None:
            kept, size = [], 0
            for m in reversed(earlier):
                size += len(m.model_dump_json())
                if size > UNCHECKED_PAYLOAD_BYTES or len(kept) >= UNCHECKED_MESSAGES:
                    break
                kept.append(m)
            kept.reverse()
            return kept, len(earlier) - len(kept), 0, None
        req.sampling.check_vocab(info.card.vocab_size)
        if req.sampling.grammar is not None:  # its first step on the model's tokenizer, as the worker will take it
            try:
                codec.grammars.check(req.sampling.grammar, req.grammar_field)
            except ValueError as e:
                raise InvalidInput(str(e), req.grammar_field) from None
        if req.raw:
            fitted = fit_raw(codec, user.text, info.sequence_length, req.sampling.max_tokens)
            return [], 0, 0, len(fitted.ids)
        fitted = fit_turn(codec, head + earlier + [user], info.sequence_length, req.sampling.max_tokens,
                          truncate=req.truncate)
        drop = fitted.dropped_messages
        return earlier[drop:], drop, fitted.truncated_tokens, len(fitted.ids)

    def _withdraw(self, tid: str, reason: str) -> WithdrawReply | None:
        """After an error whose side effect is unknown (the START reply was lost): if the turn was created and is
        still queued, end it before the caller hears of the error, so a retry never makes a second reply. A
        turn a worker has claimed (or that ended) cannot be taken back: WITHDRAW says `started`, and the caller
        is told it started (an error would have it sent again, and both turns answered). None: Redis is away."""
        try:
            return self.store.withdraw(tid, reason)
        except redis.RedisError:
            return None  # Redis is away: the turn, if it exists, is queued and will be answered once

    # -- reading a turn --------------------------------------------------------------------------------
    def queue_position(self, queue: str, turn_id: str) -> int:
        return int(self._position(keys=[queue], args=[turn_id]))

    def events(self, turn_id: str, after: str = "0-0", timeout: float | None = None) -> Iterator[StreamEvent]:
        """The turn's events from `after` (its start by default) until done or error; with writes that wait for
        replicas (CHAT_REDIS_WAIT_REPLICAS), the end once the replicas hold it (producer/reader.py)."""
        for ev in follow(self.r, self.keys, turn_id, self.queue_position, after, timeout, self.store.replication):
            if ev is not None:
                yield ev

    def wait(
        self, turn_id: str, timeout: float | None = None, on_event: Callable[[StreamEvent], None] | None = None
    ) -> TurnResult:
        for ev in self.events(turn_id, timeout=timeout):
            if on_event:
                on_event(ev)
            if ev.kind is EventKind.done and ev.result is not None:
                return ev.result
            if ev.kind is EventKind.error:
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
        turn = self.send(cid, text, sampling)
        return self.wait(turn.turn_id, timeout, on_event)

    def cancel(self, turn_id: str) -> str:
        """Stop a turn (see ConversationStore.cancel)."""
        return self.store.cancel(turn_id)

    def close(self) -> None:
        self.r.close()


__all__ = ["TERMINAL", "ChatClient", "StartedTurn", "StreamEvent", "TurnRequest"]
