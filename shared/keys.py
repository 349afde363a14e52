"""Redis key layout. Every key lives under one prefix so a deployment can share a Redis.

    {p}:conv:{cid}            hash    model, system, owner, created, turn (last turn id),
                                      busy (the turn in flight, if any)
    {p}:conv:{cid}:messages   list    ChatMessage JSON, oldest first (the system prompt is in the hash)
    {p}:turn:{tid}            hash    conversation, conv_key, status (queued|running|done|failed),
                                      attempt (fencing token), worker, user_message, enqueued_at,
                                      started_at, finished_at, result (TurnResult JSON), error, cancel
    {p}:turn:{tid}:stream     stream  {ev: start, a} then deltas {a, t} then {ev: done, result} or
                                      {ev: error, error}; a new attempt writes a new start marker
    {p}:models                set     model names that workers have served
    {p}:workers               hash    worker -> {model, busy, slots, at}: busy slots, every few seconds
    {p}:ratelimit:{key id}    hash    the HTTP API's token bucket per API key (with a TTL)
    {p}:dead                  list    dead-lettered payloads with the reason

Ids are checked against ID_PATTERN before they are put into a key, so a crafted id cannot
reach another key (no ':' '*' or spaces).
"""

from __future__ import annotations

import re

ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_ID = re.compile(ID_PATTERN)
DEFAULT_PREFIX = "chat"


def check_id(value: str, what: str = "id") -> str:
    if not isinstance(value, str) or not _ID.match(value):
        raise ValueError(f"{what}: must be 1-64 characters of letters, digits, '_' or '-', got {value!r:.80}")
    return value


class Keys:
    def __init__(self, prefix: str = DEFAULT_PREFIX):
        self.prefix = prefix

    def conv(self, cid: str) -> str:
        return f"{self.prefix}:conv:{check_id(cid, 'conversation_id')}"

    def messages(self, cid: str) -> str:
        return f"{self.conv(cid)}:messages"

    def turn(self, tid: str) -> str:
        return f"{self.prefix}:turn:{check_id(tid, 'turn_id')}"

    def stream(self, tid: str) -> str:
        return f"{self.turn(tid)}:stream"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def models(self) -> str:
        return f"{self.prefix}:models"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"
