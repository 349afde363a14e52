"""A worker's own queue, and handing it home when its worker is gone.

Besides its model's shared queue, every worker consumes a queue of its own (config/celery.py
worker_queue): producers route a conversation's turns there while that worker is live and not
overloaded, so they land where the conversation's KV cache is (producer/store.py START). Nothing may
wait there for a worker that is gone. START adds the worker's name to `{p}:routed:{model}` in the same
step as it pushes, so the set names every own queue that may hold turns; every worker's watchdog sweeps
it (`sweep`), and a worker that stops hands its own queue home itself (`hand_home(force=True)`), after
its consumer stopped, without waiting for its liveness to expire.

Handing home is one script: if the worker is not live (or `force`), everything on its queue moves onto
the shared queue's served end in the order it would have been served (kombu LPUSHes in and BRPOPs from
the right), each moved turn's `queue` field follows it, and the name leaves the set. Being one atomic
step, a queue is moved once however many watchdogs run it at the same moment; a second run finds it
empty. The messages keep their routing key (the shared queue), so kombu's own restore of what a dead
worker had popped but not acked already goes to the shared queue.

A live worker keeps its queue, but not a turn that has waited there longer than CHAT_ROUTE_MAX_WAIT_S:
its slots are all busy with long replies (while other workers may idle), or its consumer is stuck while
its heartbeat goes on. Such turns move to the shared queue the same way, oldest first, so a live worker
that stopped consuming cannot hold turns either.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis

from config.celery import BINDING_KEYS, queue_name, worker_queue
from config.settings import Settings
from shared.keys import Keys
from shared.lua import PRELUDE

log = logging.getLogger(__name__)

HAND_HOME = PRELUDE + """
-- KEYS: routed set, live zset, the worker's own queue, the shared queue, its kombu binding sets (2), queued zset
-- ARGV: worker name, force ('1': the worker itself, stopping), turn key prefix, max wait s (0: none)
-- returns {turns moved, 1 if the whole queue was handed home (its worker not live, or force) else 0}, or
-- {0, -1, type} when the own queue's key held another type: deleted (ours: producers and workers rebuild it)
local now = now_s()
local k = kind(KEYS[3])
if k ~= 'list' and k ~= 'none' then
  redis.call('DEL', KEYS[3])
  return {0, -1, k}
end
local function follow(items)  -- each moved turn's `queue` field follows its message
  for _, item in ipairs(items) do
    local id = string.match(item, '"correlation_id": "([%w_%-]+)"')
    if id then
      local turn = ARGV[3] .. id
      if redis.call('HGET', turn, 'queue') == KEYS[3] then redis.call('HSET', turn, 'queue', KEYS[4]) end
    end
  end
end
local exp = redis.call('ZSCORE', KEYS[2], ARGV[1])
if ARGV[2] ~= '1' and exp and tonumber(exp) > now then
  -- Live: only turns queued longer than the max wait leave, from the served end (the oldest) on. An item
  -- whose turn is no longer queued (answered or cancelled meanwhile) goes too: the worker that pops it skips it.
  local limit = tonumber(ARGV[4])
  if limit <= 0 then return {0, 0} end
  local moved = {}
  while true do
    local item = redis.call('LINDEX', KEYS[3], -1)
    if not item then break end
    local id = string.match(item, '"correlation_id": "([%w_%-]+)"')
    local at = id and redis.call('ZSCORE', KEYS[7], id)
    if at and tonumber(at) > now - limit then break end
    moved[#moved + 1] = redis.call('RPOP', KEYS[3])
  end
  for i = #moved, 1, -1 do redis.call('RPUSH', KEYS[4], moved[i]) end  -- the oldest ends rightmost: next
  follow(moved)
  return {#moved, 0}
end
local items = redis.call('LRANGE', KEYS[3], 0, -1)
-- LRANGE lists newest first; pushed on the right in that order, the oldest ends rightmost: served next.
for i = 1, #items, 1000 do redis.call('RPUSH', KEYS[4], unpack(items, i, math.min(i + 999, #items))) end
follow(items)
redis.call('DEL', KEYS[3], KEYS[5], KEYS[6])
redis.call('SREM', KEYS[1], ARGV[1])
return {#items, 1}
"""


@dataclass(frozen=True)
class Handed:
    """What one hand-home did."""

    moved: int  # turns moved onto the shared queue
    whole: bool  # the whole queue, and the name left the routed set (its worker is gone, or stopping)


class OwnQueues:
    """Hands the own queues of one model's workers home to the model's shared queue."""

    def __init__(self, r: redis.Redis, settings: Settings, model: str):
        self.r = r
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.model = model
        self.shared = queue_name(settings, model)
        self.max_wait_s = settings.route_max_wait_s
        self._hand_home = r.register_script(HAND_HOME)

    def hand_home(self, worker: str, force: bool = False) -> Handed:
        """Move `worker`'s own queue onto the shared queue if the worker is not live (or `force`: the worker
        itself, stopping); if it is live, only the turns that waited there longer than the max wait.
        Raises redis.RedisError."""
        queue = worker_queue(self.settings, self.model, worker)
        moved, whole, *kind = self._hand_home(
            keys=[self.keys.routed(self.model), self.keys.live(self.model), queue, self.shared,
                  *(k.format(queue) for k in BINDING_KEYS), self.keys.queued],
            args=[worker, int(force), self.keys.turn_prefix, self.max_wait_s])
        if int(whole) < 0:
            log.error("%s held a %s, not a list: deleted (a worker's own queue is ours to rebuild)", queue,
                      _text(kind[0]))
            return Handed(0, False)
        return Handed(int(moved), bool(whole))

    def sweep(self) -> dict[str, Handed]:
        """Hand home every routed worker's queue: {worker: what moved} for each worker that is not live
        (`whole`, even with nothing on its queue) and each live one that lost turns waiting too long.
        Raises redis.RedisError."""
        routed = self.keys.routed(self.model)
        try:
            members = self.r.smembers(routed)
        except redis.ResponseError as e:
            if "WRONGTYPE" not in str(e):
                raise
            members = self._rebuild_routed()
        out = {}
        for raw in members:
            try:
                name = raw.decode() if isinstance(raw, bytes) else str(raw)
            except UnicodeDecodeError:  # no worker is named so: nothing was ever routed to it
                log.error("%s held %r, not a worker name: removed", routed, raw[:80])
                self.r.srem(routed, raw)
                continue
            try:
                handed = self.hand_home(name)
            except redis.ResponseError as e:  # one bad key must not stop the sweep of the others
                log.error("handing worker %s's own queue home failed: %s", name, e)
                continue
            if handed.whole or handed.moved:
                out[name] = handed
        return out

    def _rebuild_routed(self) -> set[bytes]:
        """The routed set held another type: deleted, and rebuilt from the own queues that exist (SCAN), so
        no dead worker's queue goes unswept. Returns the names found."""
        routed = self.keys.routed(self.model)
        log.error("%s held another type, not a set: deleted and rebuilt from the own queues found", routed)
        self.r.delete(routed)
        prefix = worker_queue(self.settings, self.model, "")
        names = {key[len(prefix.encode()):] for key in self.r.scan_iter(match=_glob_escape(prefix) + "*", _type="list")
                 if isinstance(key, bytes)}
        if names:
            self.r.sadd(routed, *names)
        return names


def _text(v: object) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def _glob_escape(s: str) -> str:
    """`s` matched literally in a Redis MATCH pattern (model names may hold glob characters)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)
