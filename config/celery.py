"""Celery configuration as one object, shared by producers (which only publish) and workers.

The delivery settings are what make "never lose a turn" hold (see README, Guarantees):
acks_late + reject_on_worker_lost keep a turn in Redis until its worker is done with it;
prefetch 1 per slot means a worker reserves no more turns than it can start; the visibility
timeout (broker and result backend alike) is how long an unacked turn waits before Redis hands it
to another worker, so it must exceed the longest turn.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from config.settings import Settings

GENERATE_TASK = "generate"


def queue_name(settings: Settings, model: str) -> str:
    """One queue per model: a turn is routed by its conversation's model."""
    return f"{settings.key_prefix}.{model}"


def restore_interval_s(settings: Settings) -> int:
    """Seconds between two sweeps for unacked turns whose visibility timeout has passed."""
    return max(1, min(60, settings.visibility_timeout_s // 10))


class CeleryConfig:
    def __init__(self, settings: Settings):
        transport: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout_s}
        self.broker_url = settings.redis_url
        self.result_backend = settings.redis_url
        # How soon a lost worker's turns come back: kombu's Redis transport sweeps its unacked index
        # (restore_visible) every `unacked_restore_interval` s but scans only on every
        # `unacked_restore_throttle`-th sweep (defaults 10 s x 10 = 100 s, whatever the timeout). Scan on
        # every sweep, a tenth of the visibility timeout apart (1..60 s): a turn lost with its worker is
        # redelivered between visibility_timeout and visibility_timeout + restore_interval_s(settings) after
        # its delivery.
        self.broker_transport_options = {
            **transport,
            "unacked_restore_interval": restore_interval_s(settings),
            "unacked_restore_throttle": 1,
        }
        self.result_backend_transport_options = dict(transport)
        self.broker_connection_retry_on_startup = True
        self.broker_connection_max_retries = None  # a Redis restart is waited out, not fatal
        self.task_serializer = "json"
        self.result_serializer = "json"
        self.accept_content = ["json"]
        self.task_acks_late = True
        self.task_reject_on_worker_lost = True
        self.task_acks_on_failure_or_timeout = True
        self.worker_prefetch_multiplier = 1
        self.worker_cancel_long_running_tasks_on_connection_loss = False
        self.worker_send_task_events = True  # Flower can show workers and tasks
        self.task_send_sent_event = True
        self.task_time_limit = int(settings.turn_timeout_s) + 60  # a safety net behind the engine's deadline
        self.result_expires = settings.result_ttl_s
        self.worker_hijack_root_logger = False
        self.task_default_queue = f"{settings.key_prefix}.default"


def make_celery(settings: Settings, name: str = "chat") -> Celery:
    app = Celery(name, set_as_current=False)
    app.config_from_object(CeleryConfig(settings))
    app.chat_settings = settings  # type: ignore[attr-defined]
    return app
