"""A worker's life: attach the pipeline before consuming, shut down warm or cold, detach on every path.

    start   load and attach the pipeline (PipelineStep.start runs before Celery's Consumer step), so no
            turn is taken before the model can serve it. A load that fails ends the process with
            EXIT_START_FAILED and one clear error line; a stop signal during the load abandons it (exit 0).
    warm    first SIGTERM or SIGINT: withdraw the liveness report (producers stop counting on this
            worker), stop taking turns, let the turns in flight finish (up to CHAT_SHUTDOWN_GRACE_S),
            detach, exit 0.
    cold    SIGQUIT, a second SIGTERM/SIGINT, or the grace period running out: abandon the turns in
            flight. Each one's task queues its turn again from the kept task message (worker/turns.py
            _hand_back: status back to queued, not marked failed, no loss counted) and acks its
            delivery; another worker starts it over with a higher attempt. A delivery not yet begun
            goes back through kombu (Reject with requeue). Then detach, exit 0. A signal after that
            exits at once (EXIT_HARD), without detaching: its turns come back when their leases expire.

Why our own signal handlers: Celery's cold shutdown is an "Unrecoverable error" in the threads pool
(and in solo it marks the running task failed and acks it), and its warm shutdown stops this step
before the pool has drained, which would cut the turns it should let finish. The handlers replace
Celery's for SIGTERM, SIGINT and SIGQUIT once Celery has installed its own (Blueprint.on_start runs
before the steps start); they only end the event loop the way Celery does (celery_workarounds.end_event_loop) and
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
from enum import Enum
from typing import Any

from celery import platforms
from celery.worker import state

from config.settings import Settings
from worker.celery_workarounds import end_event_loop
from worker.runtime import Runtime, RuntimeHolder

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_START_FAILED = 3  # the pipeline could not be loaded or attached: nothing was consumed
EXIT_HARD = 4  # a signal after the cold shutdown: the process left without detaching
HANDED_BACK_WAIT_S = 10.0  # how long a cold shutdown waits for abandoned turns to hand themselves back
SIGNALS = ("SIGTERM", "SIGINT", "SIGQUIT")


class Phase(str, Enum):
    """Where a worker is in its life; it only moves down this list."""

    created = "created"  # the step exists, nothing loaded
    loading = "loading"  # the pipeline is loading: a stop signal abandons the load
    running = "running"  # attached and consuming
    warm = "warm"  # no new turns; the turns in flight finish within the grace period
    cold = "cold"  # the turns in flight are handed back to the queue
    stopped = "stopped"  # detached (or never attached)


class Lifecycle:
    def __init__(self, worker: Any, settings: Settings):
        self.worker = worker
        self.settings = settings
        self.grace_s = settings.shutdown_grace_s
        self.rt: Runtime | None = None
        self.phase = Phase.created
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
        self.phase = Phase.loading
        try:
            rt = Runtime.open(self.settings, hostname)
        except Exception as e:  # LoadError, missing poptorch, no GPU, Redis down...
            self.phase = Phase.stopped
            log.debug("pipeline start failed", exc_info=True)
            log.error("worker cannot start: %s", _describe(e))
            raise SystemExit(EXIT_START_FAILED) from None
        self.rt = rt
        self.worker.app.chat_runtime.runtime = rt
        if self.phase is Phase.loading:
            self.phase = Phase.running
        return rt

    # -- signals (main thread, between two bytecodes of whatever it was doing) ----------------------
    def _on_signal(self, signum: int, frame: Any = None) -> None:
        name = signal.Signals(signum).name
        if self.phase is Phase.loading:  # nothing consumed yet, nothing to hand back: abandon the load
            self.phase = Phase.stopped
            self.stop_reason = f"{name} while loading"
            log.warning("%s while loading the pipeline: not starting", name)
            raise SystemExit(EXIT_OK)
        if self.phase is Phase.cold or (self.phase is Phase.stopped and name == "SIGQUIT"):
            log.error("%s during a cold shutdown: exiting now without detaching", name)
            logging.shutdown()
            os._exit(EXIT_HARD)
        if self.phase is Phase.stopped:  # detached already, Celery is closing its pool and connection
            log.info("%s: already shutting down (SIGQUIT exits at once)", name)
            return
        if name == "SIGQUIT" or self.phase is Phase.warm:
            self.go_cold(name if name == "SIGQUIT" else f"second stop signal ({name})")
        else:
            self.phase = Phase.warm
            self.stop_reason = name
            log.warning(
                "%s: warm shutdown, no new turns; turns in flight get up to %.0fs to finish "
                "(SIGQUIT or a second signal hands them back)",
                name,
                self.grace_s,
            )
            self._end_event_loop()

    def request_stop(self, reason: str) -> None:
        """A warm shutdown asked for by the worker's owner (the embedded worker), from any thread: the
        worker's own thread ends its event loop and shuts down, as after a first SIGTERM."""
        if self.phase in (Phase.created, Phase.loading, Phase.running):
            self.phase = Phase.warm
            self.stop_reason = reason
            log.info("%s: warm shutdown", reason)
        self._end_event_loop()

    def go_cold(self, reason: str) -> None:
        """Abandon every turn in flight (safe from a signal handler or any thread)."""
        if self.phase in (Phase.cold, Phase.stopped):
            return
        self.phase = Phase.cold
        self.cold_reason = reason
        n = self.rt.abandon(f"worker shutting down ({reason})") if self.rt is not None else 0
        log.warning("cold shutdown (%s): abandoned %d turn(s) in flight, handing them back to the queue", reason, n)
        self._end_event_loop()

    def _end_event_loop(self) -> None:
        end_event_loop(self.worker, self.stop_reason or self.cold_reason, cold=self.phase is Phase.cold)
        self._wake.set()

    # -- stop (PipelineStep.stop / terminate, main thread) ------------------------------------------
    def in_flight(self) -> int:
        """Turns this worker has taken and not yet answered or handed back."""
        return len(state.reserved_requests)

    def shutdown(self, cold: bool = False) -> None:
        """Drain (warm) or abandon (cold) the turns in flight, then detach. Idempotent."""
        if self.rt is None or self.phase is Phase.stopped:
            self._detach()
            return
        self.rt.withdraw()  # no new turns here: producers stop counting on this worker
        if cold:
            self.go_cold(self.cold_reason or "worker terminated")
        if self.phase not in (Phase.warm, Phase.cold):  # stopped by its owner (embedded worker, Celery itself)
            self.phase = Phase.warm
            self.stop_reason = self.stop_reason or "stop requested"
        t0 = time.monotonic()
        if self.phase is Phase.warm and self.in_flight():
            log.info("warm shutdown: waiting for %d turn(s) in flight", self.in_flight())
            deadline = t0 + self.grace_s
            while self.in_flight() and self.phase is Phase.warm:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.go_cold(f"shutdown grace of {self.grace_s:g}s ran out")
                    break
                self._wake.wait(min(0.1, left))
                self._wake.clear()
            if self.phase is Phase.warm:
                log.info("warm shutdown: turns in flight finished in %.1fs", time.monotonic() - t0)
        if self.phase is Phase.cold:
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
        self.phase = Phase.stopped
        if rt is not None:
            try:
                rt.detach()
            finally:
                holder = self.worker.app.chat_runtime
                if holder.runtime is rt:
                    holder.runtime = None


def detach_attached(holder: RuntimeHolder) -> None:
    """Last resort for paths that never reach the step's stop (the worker's start raised): detach the app's
    pipeline if it is still attached. Idempotent."""
    rt = holder.runtime
    if rt is not None:
        try:
            rt.detach()
        finally:
            holder.runtime = None


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
