"""Redis key layout. Every key lives under one prefix so a deployment can share a Redis.

    {p}:conv:{cid}            hash    model, system, owner, created, turn (last turn id), busy (the turn in
                                      flight, if any), trimmed (oldest messages dropped by the history cap),
                                      worker (the one that answered its last turn: its next turn is routed
                                      there, where its KV cache is)
    {p}:conv:{cid}:messages   list    ChatMessage JSON, oldest first (the system prompt is in the hash)
    {p}:turn:{tid}            hash    conversation, conv_key, model, queue (the list its message is on now),
                                      home (the model's shared queue: where requeues go), status (TurnStatus), attempt
                                      (fencing token), lost (attempts whose worker vanished), worker,
                                      delivery, user_message, message (the queued task message, kept until
                                      the turn ends so it can be queued again), enqueued_at, started_at,
                                      finished_at, result (TurnResult JSON), error, cancel, fseq
    {p}:turn:{tid}:stream     stream  {ev: start, a} then deltas {a, t} then {ev: done, result} or
                                      {ev: error, error}; a new attempt writes a new start marker
    {p}:running               zset    turn id -> lease expiry (Redis clock): renewed by the worker holding
                                      the turn; an expired lease means its worker is gone (the watchdog
                                      queues the turn again)
    {p}:queued                zset    turn id -> when its task message was last pushed onto its queue
    {p}:models                set     model names that workers have served
    {p}:model:{model}         string  the model card (ModelCard JSON) its workers publish
    {p}:tokenizer:{sha}       hash    file name -> content: the tokenizer a model card names
    {p}:live:{model}          zset    worker name -> liveness expiry (Redis clock)
    {p}:routed:{model}        set     worker names whose own queue (config/celery.py worker_queue) may hold
                                      turns: added by the producer's START when it routes to one, removed
                                      when a watchdog hands a dead worker's queue home (worker/own_queue.py)
    {p}:worker:{name}         string  WorkerReport JSON, with a TTL: gone by itself when the worker is
    {p}:ratelimit:{key id}    hash    the HTTP API's token bucket per API key (with a TTL)
    {p}:dead                  list    dead-lettered deliveries and payloads with the reason
    {p}:arriving:{queue}      zset    turn id -> until when it counts as about to be queued (Redis clock):
                                      announced by a producer while it checks the turn (shared/arrivals.py)
    {p}:sync                  string  the last turn whose end a reader confirmed (producer/reader.py
                                      CONFIRM): written only so that the WAIT behind it has a write to wait
                                      for; expires after a minute

Ids are checked against ID_PATTERN before they are put into a key, so a crafted id cannot
reach another key (no ':' '*' or spaces). Model and worker names come from configuration.
"""

from __future__ import annotations

import re

ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
DEFAULT_PREFIX = "chat"


def check_id(value: str, what: str = "id") -> str:
    """`value` if it is 1-64 letters, digits, '_' or '-' (the whole string: no trailing newline);
    else ValueError naming `what`."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ValueError(f"{what}: must be 1-64 characters of letters, digits, '_' or '-', got {value!r:.80}")
    return value


class Keys:
    """Builds every key of the layout above for one prefix."""

    def __init__(self, prefix: str = DEFAULT_PREFIX):
        self.prefix = prefix

    def conv(self, cid: str) -> str:
        """The conversation's hash; ValueError if `cid` is not a valid id."""
        return f"{self.prefix}:conv:{check_id(cid, 'conversation_id')}"

    def messages(self, cid: str) -> str:
        """The conversation's message list (ChatMessage JSON, oldest first); ValueError if `cid` is not a valid id."""
        return f"{self.conv(cid)}:messages"

    def turn(self, tid: str) -> str:
        """The turn's hash; ValueError if `tid` is not a valid id."""
        return f"{self.prefix}:turn:{check_id(tid, 'turn_id')}"

    def stream(self, tid: str) -> str:
        """The turn's event stream (start, deltas, done or error); ValueError if `tid` is not a valid id."""
        return f"{self.turn(tid)}:stream"

    @property
    def turn_prefix(self) -> str:
        """Scripts build a turn's key from its id with this."""
        return f"{self.prefix}:turn:"

    @property
    def running(self) -> str:
        """Zset of running turns: turn id -> lease expiry (Redis clock)."""
        return f"{self.prefix}:running"

    @property
    def queued(self) -> str:
        """Zset of queued turns: turn id -> when its task message was last pushed."""
        return f"{self.prefix}:queued"

    def arriving(self, queue: str) -> str:
        """Zset of turns about to be queued on `queue`: turn id -> until when they count (Redis clock)."""
        return f"{self.prefix}:arriving:{queue}"

    @property
    def models(self) -> str:
        """Set of the model names that workers have served."""
        return f"{self.prefix}:models"

    def card(self, model: str) -> str:
        """The model's card (ModelCard JSON), published by its workers."""
        return f"{self.prefix}:model:{model}"

    def tokenizer(self, sha: str) -> str:
        """Hash of the tokenizer files (file name -> content) that model cards name by `sha`."""
        return f"{self.prefix}:tokenizer:{sha}"

    def live(self, model: str) -> str:
        """Zset of the model's live workers: worker name -> liveness expiry (Redis clock)."""
        return f"{self.prefix}:live:{model}"

    def routed(self, model: str) -> str:
        """Set of the model's worker names whose own queue may hold turns (the watchdogs sweep it)."""
        return f"{self.prefix}:routed:{model}"

    def worker(self, name: str) -> str:
        """The worker's WorkerReport JSON (with a TTL)."""
        return f"{self.prefix}:worker:{name}"

    @property
    def sync(self) -> str:
        """Written by a reader before its WAIT (producer/reader.py CONFIRM)."""
        return f"{self.prefix}:sync"

    @property
    def dead(self) -> str:
        """List of dead-lettered deliveries and payloads, each with the reason."""
        return f"{self.prefix}:dead"
