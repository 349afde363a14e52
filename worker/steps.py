"""A worker bootstep: the pipeline is attached before the consumer starts and detached at stop.

Celery starts the Consumer step last (`last = True`), so no task is consumed before `start` below
has loaded the model; on stop the Consumer step stops first (no new turns), then this step lets the
turns in flight finish or hands them back (worker/lifecycle.py) and detaches, then the Pool step
joins its threads. The step also takes over the stop signals (see lifecycle.py for why).
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps

from worker.lifecycle import Lifecycle


class PipelineStep(bootsteps.StartStopStep):
    label = "pipeline"
    # Started after the pool, so stopped before it: the turns in flight still have their threads while
    # this step drains them. (Without it the order among steps is a topological sort's free choice.)
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any):
        super().__init__(worker, **kwargs)
        self.lifecycle: Lifecycle | None = None

    def start(self, worker: Any) -> None:
        self.lifecycle = Lifecycle(worker, worker.app.chat_settings)
        worker.chat_lifecycle = self.lifecycle
        self.lifecycle.install_signals()  # Celery installed its handlers already (Blueprint.on_start)
        self.lifecycle.open(worker.hostname)

    def stop(self, worker: Any) -> None:
        """Warm: turns in flight get the grace period, then detach."""
        if self.lifecycle is not None:
            self.lifecycle.shutdown(cold=False)

    def terminate(self, worker: Any) -> None:
        """Cold (Celery's own terminate path): hand the turns in flight back, then detach."""
        if self.lifecycle is not None:
            self.lifecycle.shutdown(cold=True)

    def shutdown(self, worker: Any) -> None:
        if self.lifecycle is not None:
            self.lifecycle.shutdown(cold=True)
