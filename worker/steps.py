"""A worker bootstep: the pipeline is attached before the consumer starts and detached at stop.

Celery starts the Consumer step last (`last = True`), so no task is consumed before `start`
below has loaded the model; on stop the consumer stops first, then this step detaches.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

from worker import runtime
from worker.runtime import Runtime

log = logging.getLogger(__name__)


class PipelineStep(bootsteps.StartStopStep):
    label = "pipeline"

    def __init__(self, worker: Any, **kwargs: Any):
        super().__init__(worker, **kwargs)
        self.rt: Runtime | None = None

    def start(self, worker: Any) -> None:
        self.rt = Runtime.open(worker.app.chat_settings, worker.hostname)
        runtime.install(self.rt)

    def stop(self, worker: Any) -> None:
        self._detach()

    def shutdown(self, worker: Any) -> None:
        self._detach()

    def terminate(self, worker: Any) -> None:
        self._detach()

    def _detach(self) -> None:
        if self.rt is not None:
            self.rt.detach()
            runtime.install(None)
