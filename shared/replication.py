"""Writes that wait for replicas: a Lua script followed by Redis' WAIT on the same connection.

Redis replicates asynchronously: a primary acknowledges a write before any replica has it, so a failover
(Sentinel promoting a replica after the primary died) can take back the last writes it acknowledged.
WAIT n ms blocks until n replicas acknowledged every write this connection made, or ms passed, and
returns how many did. A script sent with WAIT behind it in one pipeline is therefore acknowledged to
our code only once it survives the primary's death (or the timeout says it may not: counted and logged,
the write stands). WAIT must follow on the connection that wrote, hence the pipeline (a pooled client
may send two separate calls over two connections, and WAIT on a connection that wrote nothing returns
at once). A pipeline loads its scripts before it is sent, not when redis-py sends it again on another
connection: after a failover the promoted replica may lack the script (scripts are not replicated), and
the reply is NOSCRIPT (the script did not run): the pipeline is sent once more, loading it there.
See docs/GUARANTEES.md for what this promises across a failover and what it does not.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aredis
from redis.commands.core import AsyncScript, Script
from redis.exceptions import NoScriptError

log = logging.getLogger(__name__)


@dataclass
class Replication:
    """How many replicas a write waits for (`replicas`, 0 = none: the script runs alone) and for how long
    at most (`timeout_ms`, milliseconds); `short` counts writes that timed out short of `replicas`."""

    replicas: int = 0
    timeout_ms: int = 500
    short: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def run(self, r: redis.Redis, script: Script, keys: list[Any], args: list[Any]) -> Any:
        """`script(keys, args)`'s reply, after the replicas acknowledged it (or the timeout passed). Raises
        what the script or the connection raises (redis.RedisError); the script may then have run (not after
        NOSCRIPT: sent again once)."""
        if not self.replicas:
            return script(keys=keys, args=args)
        for again in (True, False):
            pipe = r.pipeline(transaction=False)
            script(keys=keys, args=args, client=pipe)
            pipe.execute_command("WAIT", self.replicas, self.timeout_ms)
            try:
                reply, acked = pipe.execute()
                break
            except NoScriptError:
                if not again:
                    raise
        self._count(int(acked))
        return reply

    async def arun(self, ar: aredis.Redis, script: AsyncScript, keys: list[Any], args: list[Any]) -> Any:
        """`run` for asyncio (`script` registered on an asyncio client)."""
        if not self.replicas:
            return await script(keys=keys, args=args)
        for again in (True, False):
            pipe = ar.pipeline(transaction=False)
            await script(keys=keys, args=args, client=pipe)
            pipe.execute_command("WAIT", self.replicas, self.timeout_ms)
            try:
                reply, acked = await pipe.execute()
                break
            except NoScriptError:
                if not again:
                    raise
        self._count(int(acked))
        return reply

    def _count(self, acked: int) -> None:
        if acked < self.replicas:
            with self._lock:
                self.short += 1
            log.warning("a write reached %d of %d replicas within %d ms: a failover now could lose it",
                        acked, self.replicas, self.timeout_ms)
