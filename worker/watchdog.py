"""The watchdog: a turn taken can be delayed by a lost ack or a lost delivery, never lost.

Every worker runs one (a daemon thread). Each sweep (every lease_s / 4):

1. Running turns whose lease expired are queued again from their kept task message
   (TurnStore.rescue_expired). A lease is renewed by the flusher of the worker generating the turn
   every half second, so an expired one means that worker died, froze (SIGSTOP, a swap storm) or lost
   Redis for longer than the lease. If it comes back, its next flush finds the turn taken (a higher
   attempt) and it stops; its commit is refused.
2. The own queues of workers that are no longer live are handed home to the model's shared queue
   (OwnQueues.sweep, worker/own_queue.py): turns routed to a worker that died wait at most its
   liveness TTL (15 s) plus one sweep, then any worker serves them; on a live worker's queue, a turn
   waits at most CHAT_ROUTE_MAX_WAIT_S. Cheap: one SMEMBERS, and one script per worker that was
   routed to.
3. Every lost_after_s / 2, one worker of the pool (a lock in Redis) looks for queued turns whose
   message is on no queue and in no fresh delivery (TurnStore.requeue_lost): a worker killed
   between popping a message and recording it in kombu's unacked hash, or any other path that drops
   a message, only delays its turn.

Neither depends on kombu's unacked bookkeeping, whose own redelivery (after the visibility timeout)
then only produces duplicates, which BEGIN skips. After a Redis outage the watchdog waits one lease
of uninterrupted connection before it requeues anything, so workers that were only cut off from
Redis renew their leases first.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from config.celery import UNACKED_INDEX_KEY, UNACKED_KEY
from worker.own_queue import OwnQueues
from worker.turn_store import TurnStore

log = logging.getLogger(__name__)


class Watchdog:
    def __init__(self, turns: TurnStore, *, lease_s: float, lost_after_s: float,
                 own_queues: OwnQueues | None = None):
        self.turns = turns
        self.own_queues = own_queues
        self.lease_s = lease_s
        self.lost_after_s = lost_after_s
        self.sweep_s = max(0.5, lease_s / 4)
        self.rescued = 0
        self.recovered = 0
        self.handed_home = 0  # turns moved from own queues to the shared one (dead workers', or waited too long)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Watchdog:
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        connected_since = time.monotonic()
        last_lost_check = 0.0
        while not self._stop.wait(self.sweep_s):
            now = time.monotonic()
            try:
                if now - connected_since < self.lease_s:
                    self.turns.r.ping()
                    continue
                for tid in self.turns.rescue_expired():
                    self.rescued += 1
                    log.warning("watchdog: turn %s lost its worker (lease expired): queued again", tid)
                if self.own_queues is not None:
                    for name, handed in self.own_queues.sweep().items():
                        self.handed_home += handed.moved
                        if handed.whole:
                            (log.warning if handed.moved else log.info)(
                                "watchdog: worker %s is not live: its own queue (%d turn(s)) handed to the shared "
                                "queue", name, handed.moved)
                        else:
                            log.warning("watchdog: %d turn(s) waited over %gs on worker %s's own queue: moved to the "
                                        "shared queue", handed.moved, self.own_queues.max_wait_s, name)
                if now - last_lost_check >= self.lost_after_s / 2:
                    last_lost_check = now
                    for tid in self.turns.requeue_lost(UNACKED_KEY, UNACKED_INDEX_KEY, self.lost_after_s):
                        self.recovered += 1
                        log.warning("watchdog: turn %s was queued but its message was lost: queued again", tid)
            except redis.RedisError as e:
                log.warning("watchdog: Redis unavailable (%s); waiting a lease after it returns", e)
                connected_since = time.monotonic() + self.sweep_s
            except Exception:  # whatever Redis held, the pool's only rescuer of lost turns keeps sweeping
                log.exception("watchdog: sweep failed; sweeping again in %.1fs", self.sweep_s)
