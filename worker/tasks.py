"""The Celery task: thin. Everything it does is in turns.py; the pipeline is the process's runtime."""

from __future__ import annotations

from typing import Any

from celery import Celery

from config.celery import GENERATE_TASK
from worker import runtime
from worker.turns import run_turn


def register_tasks(app: Celery) -> None:
    @app.task(name=GENERATE_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True, shared=False)
    def generate(payload: Any) -> dict[str, Any]:
        return run_turn(runtime.current(), payload)
