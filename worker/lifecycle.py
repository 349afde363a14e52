"""A worker's life: attach the pipeline before consuming, shut down warm or cold, detach on every path.

    start   load and attach the pipeline (PipelineStep.start runs before Celery's Consumer step), so no
            turn is taken before the model can serve it. A load that fails ends the process with
            EXIT_START_FAILED and one clear error line; a stop signal during the load abandons it (exit 0).
    warm    first SIGTERM or SIGINT: stop taking turns, let the turns in flight finish (up to
            CHAT_SHUTDOWN_GRACE_S), detach, exit 0.
    cold    SIGQUIT, a second SIGTERM/SIGINT, or the grace period running out: abandon the turns in
            flight. Each one's task raises Reject(requeue=True), so its message goes back to the queue
            (not acked, not marked failed) and another worker starts it over with a higher attempt;
            then detach, exit 0. A signal after that exits at once (EXIT_HARD), without detaching.

Why our own signal handlers: Celery's cold shutdown is an "Unrecoverable error" in the threads pool
(and in solo it marks the running task failed and acks it), and its warm shutdown stops this step
before the pool has drained, which would cut the turns it should let finish. The handlers replace
Celery's for SIGTERM, SIGINT and SIGQUIT once Celery has installed its own (Blueprint.on_start runs
before the steps start); they only end the event loop the way Celery does (state.should_stop) and
never raise into a running turn. Everything after that runs in PipelineStep.stop, in the main
thread, after the Consumer step stopped consuming and before the Pool step joins its threads; the
acks and rejects that the finished turns queued on the event loop run when the Hub step closes.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

from celery import platforms, signals
from celery.worker import state

from config.settings import Settings
from worker import runtime
from worker.runtime import Runtime

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_START_FAILED = 3  # the pipeline could not be loaded or attached: nothing was consumed
EXIT_HARD = 4  # a signal after the cold shutdown: the process left without detaching
HANDED_BACK_WAIT_S = 10.0  # how long a cold shutdown waits for abandoned turns to hand themselves back
SIGNALS = ("SIGTERM", "SIGINT", "SIGQUIT")


class Lifecycle:
    def __init__(self, worker: Any, settings: Settings):
        self.worker = worker
        self.settings = settings
        self.grace_s = settings.shutdown_grace_s
        self.rt: Runtime | None = None
        self.phase = "created"  # created | loading | running | warm | cold | stopped
        self.stop_reason: str | None = None
        self.cold_reason: str | None = None
        self._wake = threading.Event()
        self.signals_installed = False

    # -- start -------------------------------------------------------------------------------------
    def install_signals(self) -> None:
        """Take over SIGTERM/SIGINT/SIGQUIT. Only a worker running in the main thread owns the process's
        signals (an embedded worker in a thread is stopped by its owner instead)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for name in SIGNALS:
            platforms.signals[name] = self._on_signal
        self.signals_installed = True

    def open(self, hostname: str) -> Runtime:
        self.phase = "loading"
        try:
            rt = Runtime.open(self.settings, hostname)
        except Exception as e:  # LoadError, missing poptorch, no GPU, Redis down...
            self.phase = "stopped"
            log.debug("pipeline start failed", exc_info=True)
            log.error("worker cannot start: %s", _describe(e))
            raise SystemExit(EXIT_START_FAILED) from None
        if self.settings.visibility_timeout_s <= self.settings.turn_timeout_s:
            log.warning(
                "CHAT_VISIBILITY_TIMEOUT_S=%d does not exceed CHAT_TURN_TIMEOUT_S=%g: a turn running longer "
                "than the visibility timeout is delivered again while it runs (only one reply is still "
                "committed, but the work is done twice and each delivery counts as an attempt)",
                self.settings.visibility_timeout_s,
                self.settings.turn_timeout_s,
            )
        self.rt = rt
        runtime.install(rt)
        if self.phase == "loading":
            self.phase = "running"
        return rt

    # -- signals (main thread, between two bytecodes of whatever it was doing) ----------------------
    def _on_signal(self, signum: int, frame: Any = None) -> None:
        name = signal.Signals(signum).name
        if self.phase == "loading":  # nothing consumed yet, nothing to hand back: abandon the load
            self.phase = "stopped"
            self.stop_reason = f"{name} while loading"
            log.warning("%s while loading the pipeline: not starting", name)
            raise SystemExit(EXIT_OK)
        if self.phase == "cold" or (self.phase == "stopped" and name == "SIGQUIT"):
            log.error("%s during a cold shutdown: exiting now without detaching", name)
            logging.shutdown()
            os._exit(EXIT_HARD)
        if self.phase == "stopped":  # detached already, Celery is closing its pool and connection
            log.info("%s: already shutting down (SIGQUIT exits at once)", name)
            return
        if name == "SIGQUIT" or self.phase == "warm":
            self.go_cold(name if name == "SIGQUIT" else f"second stop signal ({name})")
        else:
            self.phase = "warm"
            self.stop_reason = name
            log.warning(
                "%s: warm shutdown, no new turns; turns in flight get up to %.0fs to finish "
                "(SIGQUIT or a second signal hands them back)",
                name,
                self.grace_s,
            )
            self._end_event_loop()

    def go_cold(self, reason: str) -> None:
        """Abandon every turn in flight (safe from a signal handler or any thread)."""
        if self.phase in ("cold", "stopped"):
            return
        self.phase = "cold"
        self.cold_reason = reason
        n = self.rt.abandon(f"worker shutting down ({reason})") if self.rt is not None else 0
        log.warning("cold shutdown (%s): abandoned %d turn(s) in flight, handing them back to the queue", reason, n)
        self._end_event_loop()

    def _end_event_loop(self) -> None:
        if state.should_stop is None or state.should_stop is False:
            state.should_stop = EXIT_OK  # what Celery's own handler sets: the consumer loop ends warm
            signals.worker_shutting_down.send(sender=getattr(self.worker, "hostname", None),
                                              sig=self.stop_reason or self.cold_reason,
                                              how="Cold" if self.phase == "cold" else "Warm",
                                              exitcode=EXIT_OK)
        self._wake.set()
        hub = getattr(self.worker, "hub", None)
        waker = getattr(hub, "_waker", None)  # interrupt the poller now, not at its next timeout
        if waker is not None:
            waker.wake()

    # -- stop (PipelineStep.stop / terminate, main thread) ------------------------------------------
    def in_flight(self) -> int:
        """Turns this worker has taken and not yet answered or handed back."""
        return len(state.reserved_requests)

    def shutdown(self, cold: bool = False) -> None:
        """Drain (warm) or abandon (cold) the turns in flight, then detach. Idempotent."""
        if self.rt is None or self.phase == "stopped":
            self._detach()
            return
        if cold:
            self.go_cold(self.cold_reason or "worker terminated")
        if self.phase not in ("warm", "cold"):  # stopped by its owner (embedded worker, Celery itself)
            self.phase = "warm"
            self.stop_reason = self.stop_reason or "stop requested"
        t0 = time.monotonic()
        if self.phase == "warm" and self.in_flight():
            log.info("warm shutdown: waiting for %d turn(s) in flight", self.in_flight())
            deadline = t0 + self.grace_s
            while self.in_flight() and self.phase == "warm":
                left = deadline - time.monotonic()
                if left <= 0:
                    self.go_cold(f"shutdown grace of {self.grace_s:g}s ran out")
                    break
                self._wake.wait(min(0.1, left))
                self._wake.clear()
            if self.phase == "warm":
                log.info("warm shutdown: turns in flight finished in %.1fs", time.monotonic() - t0)
        if self.phase == "cold":
            self.rt.abandon(f"worker shutting down ({self.cold_reason})")  # again: catches late arrivals
            end = time.monotonic() + HANDED_BACK_WAIT_S
            while self.in_flight() and time.monotonic() < end:
                time.sleep(0.05)
            if self.in_flight():
                log.warning("cold shutdown: %d turn(s) still running after %.0fs; detaching anyway "
                            "(their messages stay unacked and come back after the visibility timeout)",
                            self.in_flight(), HANDED_BACK_WAIT_S)
        self._detach()

    def _detach(self) -> None:
        rt, self.rt = self.rt, None
        self.phase = "stopped"
        if rt is not None:
            try:
                rt.detach()
            finally:
                if runtime.installed() is rt:
                    runtime.install(None)


def detach_installed() -> None:
    """Last resort for paths that never reach the step's stop (the worker's start raised): detach the
    process's pipeline if it is still attached. Idempotent."""
    rt = runtime.installed()
    if rt is not None:
        try:
            rt.detach()
        finally:
            runtime.install(None)


def patch_kombu_reconnect() -> None:
    """Keep a worker alive through a broker restart (kombu 5.7's Redis transport).

    When the connection drops while turns are unacked, Celery closes the broken connection; closing
    its channel tries to put the unacked messages back, and by then kombu has already cut the channel
    loose from its connection (`transport.client = None`), so building a Redis client for that fails
    with AttributeError ('NoneType' object has no attribute 'hostname'; kombu issues 582, 970). That
    is not one of the connection errors Celery tolerates there: "Unrecoverable error", the worker
    exits. Raised as the connection error it is, the close goes on, the consumer reconnects, and the
    messages stay in kombu's unacked hash in Redis until the visibility timeout hands them out again
    (the turns still running here commit first; the redelivery then finds them done and skips them).
    """
    import redis as redis_py
    from kombu.transport import redis as kombu_redis

    channel = kombu_redis.Channel
    if getattr(channel._connparams, "_chat_patched", False):
        return
    original = channel._connparams

    def _connparams(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(self.connection, "client", None) is None:
            raise redis_py.ConnectionError("broker connection already closed")
        return original(self, *args, **kwargs)

    _connparams._chat_patched = True  # type: ignore[attr-defined]
    channel._connparams = _connparams


MAX_DEAD_BODY_CHARS = 10_000


def guard_task_messages(task: Any) -> None:
    """Make a malformed *message* (not just a malformed payload) a dead letter instead of a dead worker.

    Celery turns a task message whose body is not `[args, kwargs, embed]` into an exception inside its
    consumer ("Unrecoverable error": the worker exits, and kombu puts the message back at the warm
    stop, so it kills the next worker too, forever). With this strategy the generate task checks the
    envelope first: the wrong shape, or anything but exactly one positional argument, is dead-lettered
    in `chat:dead` with the reason and rejected (not requeued) through Celery's own invalid-task path.
    Installed on the task object, so it survives the consumer rebuilding its strategies on reconnect.
    """
    task.Strategy = f"{__name__}:guarded_strategy"


def guarded_strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Any:
    from celery.exceptions import InvalidTaskError
    from celery.worker.strategy import default
    from kombu.exceptions import ContentDisallowed, DecodeError

    handler = default(task, app, consumer, **kwargs)

    def task_message_handler(message: Any, body: Any, *args: Any, **kw: Any) -> Any:
        try:
            problem = _envelope_problem(task.name, message, body)
            if problem is None:
                return handler(message, body, *args, **kw)
        except (InvalidTaskError, ContentDisallowed, DecodeError):
            raise  # Celery's consumer handles these itself (logs, rejects)
        except Exception as e:  # what Celery's consumer would die of
            problem = f"malformed task message: {type(e).__name__}: {e}"
        _dead_letter_message(message, problem)
        raise InvalidTaskError(problem)

    return task_message_handler


def _envelope_problem(name: str, message: Any, body: Any) -> str | None:
    """What is wrong with a protocol-2 task message's body ([args, kwargs, embed]), if anything."""
    payload = message.payload
    if body is not None or (isinstance(payload, dict) and "args" in payload):
        return None  # protocol 1 / hybrid: Celery converts it, the handler's guard covers the rest
    if not (isinstance(payload, list | tuple) and len(payload) == 3 and isinstance(payload[0], list | tuple)
            and isinstance(payload[1], dict) and isinstance(payload[2], dict | None)):
        return "malformed task message: the body is not [args, kwargs, embed]"
    if len(payload[0]) != 1 or payload[1]:
        return (f"malformed task message: {name} takes exactly one payload argument, got "
                f"{len(payload[0])} positional and {len(payload[1])} keyword argument(s)")
    return None


def _dead_letter_message(message: Any, reason: str) -> None:
    rt = runtime.installed()
    if rt is None:
        return
    body = message.body
    if isinstance(body, bytes | bytearray | memoryview):
        body = bytes(body).decode("utf-8", "replace")
    body = str(body)
    if len(body) > MAX_DEAD_BODY_CHARS:
        body = body[:MAX_DEAD_BODY_CHARS] + "...<truncated>"
    try:
        rt.turns.dead_letter({"message_body": body, "headers": dict(message.headers or {})}, reason)
    except Exception:  # noqa: BLE001 - Redis down: Celery still logs and rejects it
        log.exception("could not dead-letter a malformed message")


def _describe(e: BaseException) -> str:
    """The error and its causes on one line, without repeating a cause the message already quotes."""
    parts = [f"{type(e).__name__}: {e}"]
    cause = e.__cause__ or e.__context__
    while cause is not None and len(parts) < 4:
        text = str(cause)
        if text and text not in parts[-1]:
            parts.append(f"{type(cause).__name__}: {text}")
        cause = cause.__cause__ or cause.__context__
    return " <- ".join(parts)
