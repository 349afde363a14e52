"""The Celery task: thin. Everything it does is in turns.py; the pipeline is its app's attached runtime,
reached through the task's base class."""

from __future__ import annotations

from typing import Any

from celery import Celery, Task

from config.celery import GENERATE_TASK
from worker.runtime import Runtime
from worker.turns import run_turn


class TurnTask(Task):
    """Base of the generate task: `runtime` is the pipeline its worker app has attached."""

    @property
    def runtime(self) -> Runtime:
        """Raises RuntimeError when no pipeline is attached (see RuntimeHolder.current)."""
        return self.app.chat_runtime.current()  # type: ignore[no-any-return]


def register_tasks(app: Celery) -> None:
    @app.task(name=GENERATE_TASK, base=TurnTask, bind=True, acks_late=True, reject_on_worker_lost=True,
              ignore_result=True, shared=False)
    def generate(self: TurnTask, payload: Any) -> dict[str, Any]:
        return run_turn(self.runtime, payload)
