"""Turns about to be queued, so that an idle worker can wait a few milliseconds for them.

A burst of requests reaches the HTTP API together but is queued over tens of milliseconds (each one is
checked and fitted in turn). A worker that pops the first of them sees an empty queue and would prefill
it alone, making the rest of the burst wait for that whole prefill before theirs (8 streaming clients:
+60-130 ms of TTFT). So a producer announces a turn while it checks it, and an idle worker counts what is
queued behind its delivery plus what is announced (`backlog`) and holds its first prefill for them
(Engine.expect, at most ARRIVAL_WINDOW_S).

    {p}:arriving:{queue}   zset   turn id -> until when (Redis clock, s) it counts as about to be queued

A producer announces a turn on the queue it expects START to route it to (a worker's own queue, or the
model's shared queue: producer/client.py), and a worker counts both queues it consumes.

An announcement ends when its turn's START runs (whatever START answers), when the producer fails before
that, or by itself after ANNOUNCE_TTL_S (a producer that died): a stale one costs at most one bounded hold.
"""

from __future__ import annotations

import contextlib

import redis

from shared.keys import Keys
from shared.lua import PRELUDE

ANNOUNCE_TTL_S = 0.5  # a turn is checked and fitted in a few ms; past this its producer is gone

ANNOUNCE = PRELUDE + """
-- KEYS: arriving zset   ARGV: turn id, ttl s
local now = now_s()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 1000) + 1000)
return 1
"""

BACKLOG = PRELUDE + """
-- KEYS: (queue list, its arriving zset) pairs   returns: deliveries queued + turns announced and not yet expired
local now, n = now_s(), 0
for i = 1, #KEYS, 2 do n = n + redis.call('LLEN', KEYS[i]) + redis.call('ZCOUNT', KEYS[i + 1], now, '+inf') end
return n
"""


class Arrivals:
    """Announce turns (producers) and count what is coming (workers), for one Redis and key prefix."""

    def __init__(self, r: redis.Redis, keys: Keys):
        self.r = r
        self.keys = keys
        self._announce = r.register_script(ANNOUNCE)
        self._backlog = r.register_script(BACKLOG)

    def announce(self, queue: str, turn_id: str) -> None:
        """Best effort (a Redis error here is the start's to report): the turn counts as arriving on
        `queue` until withdrawn, started, or ANNOUNCE_TTL_S."""
        with contextlib.suppress(redis.RedisError):
            self._announce(keys=[self.keys.arriving(queue)], args=[turn_id, ANNOUNCE_TTL_S])

    def withdraw(self, queue: str, turn_id: str) -> None:
        """The turn will not be queued after all (its start failed before START ran). Best effort."""
        with contextlib.suppress(redis.RedisError):
            self.r.zrem(self.keys.arriving(queue), turn_id)

    def backlog(self, *queues: str) -> int:
        """Deliveries waiting on `queues` plus turns announced for them (a worker asks for the queues it
        consumes: its model's shared queue and its own). Raises redis.RedisError."""
        return int(self._backlog(keys=[k for q in queues for k in (q, self.keys.arriving(q))]))
