"""Every place this worker changes how Celery 5.7 / kombu 5.7 behave, each with the behaviour it guards
against. The worker app selects them through its config (config/celery.py: broker_transport,
worker_consumer); nothing here is patched into Celery's or kombu's modules.

GuardedTransport, GuardedSentinelTransport (kombu's Redis and Sentinel transports, two methods wider)
    * Screens every item BRPOP returns before kombu parses it (worker/deliveries.py). kombu's
      `_brpop_read` calls `loads()` on the raw item: a non-JSON item raises out of the event loop and
      Celery exits ("Unrecoverable error"); an item that is JSON but not an envelope (`[1,2,3]`) dies
      in `virtual.Message.__init__` (TypeError); an envelope without `body` dies in Celery's
      `on_unknown_message` -> `dump_body` (len(None)). Each such exit restores the item, so every
      worker of the model dies on it in turn. A refused item is dead-lettered and its turn answered.
    * Passes on the canonical message for the validated payload, not the item as it came (see
      deliveries.py: a non-string `shadow` header wedged a worker slot for good, embedded chains and
      callbacks made Celery publish), with a delivery tag of its own.
    * Why a tag per delivery: kombu keeps a message's tag across redeliveries, and
      its unacked hash is keyed by tag, so when a turn was redelivered while its first delivery was
      still alive (a visibility timeout passed, or a dropped connection made kombu restore what that
      channel held), the first delivery's ack deleted the entry the live delivery depended on, and a
      crash of the live one then lost the turn for good. With a tag per delivery an ack removes only
      its own entry.
    * Makes a closed channel's Redis client a connection error (`_connparams`): when the connection
      drops while turns are unacked, Celery closes the broken connection, and closing its channel
      tries to restore the unacked messages through a Redis client built after kombu already cut the
      channel loose (`transport.client = None`): AttributeError ('NoneType' object has no attribute
      'hostname'; kombu issues 582, 970), which Celery does not tolerate there: the worker exits.
      Raised as the connection error it is, the close goes on and the consumer reconnects.

keep_transport (the worker app's broker_failover_strategy)
    A sentinel:// URL list is kombu's failover list too: on each failed connect kombu's Connection switches to
    the next entry, and `Connection.switch` takes the transport from that entry's scheme, so the consumer that
    reconnected after a failover ran kombu's plain Sentinel transport, none of the guards above: its close
    after the next failover died on the AttributeError (seen in test_failover under load on a slow machine:
    every worker exited and the queued turns waited for none). The strategy hands kombu the same entries with
    our transport's alias as their scheme. The sentinel transport still asks every sentinel in the list (it
    reads them from the list itself), so nothing is lost by staying on one transport.

GuardedConsumer (Celery's consumer, four handlers)
    Celery logs and drops a message it cannot route (unknown task, invalid headers, undecodable or
    disallowed content): its turn then waits forever. The screen above refuses all of those first;
    these overrides are the net behind it, dead-lettering and answering the same way.

end_event_loop (our stop signals, worker/lifecycle.py)
    The worker replaces Celery's SIGTERM/SIGINT/SIGQUIT handlers (Celery 5.7's cold shutdown is an
    "Unrecoverable error" in the threads pool, and its warm shutdown stops our step before the pool
    drained). Ending the consumer loop the way Celery's own handler does takes two internals: the
    module flag `celery.worker.state.should_stop` (what `_shutdown_handler` sets; the loop checks it
    between polls) and the event loop's waker (`Hub._waker`, kombu 5.7), without which the loop sees
    the flag only when its poll times out, up to a second later.

Also Celery's, elsewhere because they are configuration: the unacked-sweep tuning in config/celery.py
(kombu's Redis transport scans its unacked hash only every 10th sweep by default) and the task options
in worker/tasks.py (acks_late + reject_on_worker_lost: see docs/GUARANTEES.md).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import redis as redis_py
from celery import signals
from celery.worker import state
from celery.worker.consumer import Consumer
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis

from worker.deliveries import Accepted, Refused, item_text, screen, turn_id_or_none
from worker.runtime import Runtime, RuntimeHolder
from worker.turn_store import TurnStore

log = logging.getLogger(__name__)
HOLDER_OPTION = "chat_runtime"  # the broker transport option that carries the app's RuntimeHolder


def refuse(turns: TurnStore | None, refused: Refused) -> None:
    """Dead-letter a refused delivery and fail each queued turn it names, with the reason (only logged when
    no pipeline is attached: `turns` None)."""
    log.error("dead-lettering a delivery: %s", refused.reason)
    if turns is None:
        return
    try:  # the turns first: once the dead letter is there, every turn it names has its answer
        for tid in refused.turn_ids:
            turns.fail(tid, 0, refused.reason)
        turns.dead_letter({"delivery": refused.item, "turn_ids": list(refused.turn_ids)}, refused.reason)
    except redis_py.RedisError:
        log.exception("could not dead-letter a refused delivery")


def _screen_reply(reply: Any, rt: Runtime | None) -> Any:
    dest, item = reply
    queue = (dest.decode() if isinstance(dest, bytes) else str(dest)).split("\x06\x16")[0]  # less the priority
    # Whether popped from the shared queue or this worker's own, a redelivery (kombu's restore, a Reject with
    # requeue) goes to the shared queue: this worker may be gone by then (worker/own_queue.py).
    home = rt.home_queue if rt is not None else queue
    result = screen(item, rt.model.name if rt is not None else None, home)
    if isinstance(result, Accepted):
        if rt is not None:  # a prefill about to start may wait for it and for what is coming (Engine.expect)
            behind = 0
            if rt.engine.idle:  # only an idle engine holds a prefill: one call per burst, not per turn
                with contextlib.suppress(redis_py.RedisError):
                    behind = rt.arrivals.backlog(rt.home_queue, rt.own_queue)  # queued + announced, both queues
            rt.engine.expect(result.task.turn_id, behind)
        return dest, result.item
    refuse(rt.turns if rt is not None else None, result)
    return None  # kombu treats it as an empty poll (Empty) and issues the next BRPOP


class _ScreeningRedis(redis_py.Redis):
    chat_runtime: RuntimeHolder | None = None  # set per client by the channel that made it

    def parse_response(self, connection: Any, command_name: Any, **options: Any) -> Any:
        reply = super().parse_response(connection, command_name, **options)
        if command_name == "BRPOP" and reply:
            return _screen_reply(reply, self.chat_runtime.runtime if self.chat_runtime else None)
        return reply


class _Guards:
    """What GuardedChannel and GuardedSentinelChannel add to kombu's channels (see the module's doc). The
    worker app's RuntimeHolder arrives as a transport option (worker/app.py) and goes to every client the
    channel makes, so the screen checks deliveries against that app's pipeline."""

    chat_runtime: RuntimeHolder | None = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        client = super()._create_client(asynchronous)  # type: ignore[misc]
        if isinstance(client, _ScreeningRedis):
            client.chat_runtime = self.chat_runtime
        return client

    def _get_client(self) -> Any:
        client = super()._get_client()  # type: ignore[misc]
        if client is not redis_py.Redis:  # a global key prefix: kombu's own prefixed client, unscreened
            log.warning("broker key prefix in use: deliveries are not screened")
            return client
        return _ScreeningRedis

    def _connparams(self, *args: Any, **kwargs: Any) -> Any:
        if getattr(self.connection, "client", None) is None:  # type: ignore[attr-defined]
            raise redis_py.ConnectionError("broker connection already closed")
        try:
            return super()._connparams(*args, **kwargs)  # type: ignore[misc]
        except AttributeError as e:  # closed under us (a consumer restart after a failover): a connection error,
            raise redis_py.ConnectionError(f"broker connection already closed ({e})") from None  # which kombu retries


class GuardedChannel(_Guards, kombu_redis.Channel):
    """kombu's Redis channel with the guards."""

    from_transport_options = kombu_redis.Channel.from_transport_options + (HOLDER_OPTION,)


class GuardedSentinelChannel(_Guards, kombu_redis.SentinelChannel):
    """kombu's Sentinel channel (asks the sentinels for the primary on each connect) with the guards."""

    from_transport_options = kombu_redis.SentinelChannel.from_transport_options + (HOLDER_OPTION,)


class GuardedTransport(kombu_redis.Transport):
    """The worker's broker transport for redis:// URLs."""

    Channel = GuardedChannel


class GuardedSentinelTransport(kombu_redis.SentinelTransport):
    """The worker's broker transport for sentinel:// URL lists."""

    Channel = GuardedSentinelChannel


# The worker's broker_transport (config/celery.py picks one by the URL's scheme).
TRANSPORT_ALIASES.setdefault("chat-redis", f"{__name__}:GuardedTransport")
TRANSPORT_ALIASES.setdefault("chat-sentinel", f"{__name__}:GuardedSentinelTransport")


def keep_transport(transport: str) -> Callable[[Sequence[str]], Iterator[str]]:
    """A kombu failover strategy (Celery's `broker_failover_strategy`) that cycles through the broker URL
    list round-robin, as kombu's default does, with every entry's scheme replaced by `transport` (a
    TRANSPORT_ALIASES name such as "chat-sentinel"), so a reconnect keeps the worker's guarded transport
    (see the module's doc). Entries without a scheme pass unchanged (kombu then keeps the first transport)."""

    def strategy(alternates: Sequence[str]) -> Iterator[str]:
        return itertools.cycle([transport + u[u.index("://"):] if "://" in u else u for u in alternates])

    return strategy


class GuardedConsumer(Consumer):
    def _refuse_message(self, message: Any, reason: str) -> None:
        headers = message.headers if isinstance(message.headers, dict) else {}
        tid = headers.get("id") or (message.properties or {}).get("correlation_id")
        body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
        tid = turn_id_or_none(tid)
        rt = self.app.chat_runtime.runtime
        refuse(rt.turns if rt is not None else None, Refused(reason, (tid,) if tid else (), item_text(body)))
        message.reject_log_error(log, self.connection_errors)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._refuse_message(message, "malformed task message: no task name")

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        self._refuse_message(message, f"malformed task message: unknown task ({exc})")

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        self._refuse_message(message, f"malformed task message: {exc}")

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        self._refuse_message(message, f"malformed task message: cannot decode the body ({exc})")



def end_event_loop(worker: Any, reason: str | None, cold: bool) -> None:
    """End the consumer's event loop as Celery's own stop handler does (see the module's doc), from any
    thread or a signal handler. `worker`: Celery's WorkController (its `hub` is None before it starts).
    Idempotent: the shutdown signal is sent once."""
    if state.should_stop is None or state.should_stop is False:
        state.should_stop = 0  # Celery's EX_OK: the consumer loop ends warm, the process exits 0
        signals.worker_shutting_down.send(sender=getattr(worker, "hostname", None), sig=reason,
                                          how="Cold" if cold else "Warm", exitcode=0)
    waker = getattr(getattr(worker, "hub", None), "_waker", None)  # interrupt the poller now
    if waker is not None:
        waker.wake()
