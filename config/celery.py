"""Celery configuration as one object. Only workers run Celery: producers push the task message onto the
model's queue list themselves, atomically with storing the turn (shared/task_message.py).

What makes "never lose a turn" hold (see docs/GUARANTEES.md): acks_late + reject_on_worker_lost
keep a delivery in kombu's unacked hash until its worker is done with it; prefetch 1 per slot means a
worker reserves no more turns than it can start; every delivery is screened and gets its own tag
(worker/celery_workarounds.py); and, independently of kombu's bookkeeping, a running turn holds a
lease that its worker renews, so the watchdog queues it again when the worker is gone. kombu's own
visibility timeout stays as a second net behind the lease (an unacked delivery older than it is
delivered again; a duplicate delivery of a live or finished turn is skipped, so it only costs a skip).
"""

from __future__ import annotations

from celery import Celery

from config.redis_clients import sentinel_target
from config.settings import Settings
from shared.task_message import GENERATE_TASK

__all__ = ["GENERATE_TASK", "CeleryConfig", "make_celery", "queue_name", "restore_interval_s", "worker_queue"]

UNACKED_KEY, UNACKED_INDEX_KEY = "unacked", "unacked_index"  # kombu's Redis transport defaults
# kombu's Redis transport (5.7) keeps each exchange's bindings in sets under these names, and Celery names a
# queue's exchange after the queue: a worker's own queue leaves two behind, deleted when it is handed home
# (nothing reads them for our messages, whose exchange is the default one).
BINDING_KEYS = ("_kombu.binding.{}", "_kombu.binding_permanent.{}")


def queue_name(settings: Settings, model: str) -> str:
    """The model's shared queue: every worker of the model consumes it, and it is every turn's home (the
    routing key inside its task message, where requeues and kombu's own restores go)."""
    return f"{settings.key_prefix}.{model}"


def worker_queue(settings: Settings, model: str, worker: str) -> str:
    """The queue only `worker` (its Celery hostname, the name in `{p}:live:{model}`) consumes, beside the
    shared one: producers route a conversation's turns there while that worker is live and not overloaded,
    so they land where its KV cache is. `worker=""` gives the prefix the START script appends a name to."""
    return f"{queue_name(settings, model)}.w.{worker}"


def restore_interval_s(settings: Settings) -> int:
    """Seconds between two sweeps for unacked turns whose visibility timeout has passed."""
    return max(1, min(60, settings.visibility_timeout_s // 10))


class CeleryConfig:
    def __init__(self, settings: Settings):
        self.broker_url = settings.redis_url
        # How soon kombu itself redelivers an unacked message: it sweeps its unacked index every
        # `unacked_restore_interval` s but scans only on every `unacked_restore_throttle`-th sweep (defaults
        # 10 s x 10 = 100 s, whatever the timeout). Scan on every sweep, a tenth of the visibility timeout
        # apart (1..60 s).
        self.broker_transport_options = {
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": restore_interval_s(settings),
            "unacked_restore_throttle": 1,
            "unacked_key": UNACKED_KEY,
            "unacked_index_key": UNACKED_INDEX_KEY,
        }
        if sentinel_target(settings.redis_url, settings.redis_master_name) is not None:
            # kombu's sentinel transport (the URL's scheme selects it): it asks the sentinels for the primary
            # on every connect, so the consumer's reconnect after a failover finds the promoted replica.
            self.broker_transport_options["master_name"] = settings.redis_master_name
        if settings.redis_password is not None:  # kombu uses it when the URL carries none
            self.broker_password = settings.redis_password.get_secret_value()
        self.broker_connection_retry_on_startup = True
        self.broker_connection_max_retries = None  # a Redis restart is waited out, not fatal
        self.task_serializer = "json"
        self.accept_content = ["json"]
        self.task_acks_late = True
        self.task_reject_on_worker_lost = True
        self.task_ignore_result = True  # a turn's result lives in its own record and stream
        self.worker_prefetch_multiplier = 1
        self.worker_cancel_long_running_tasks_on_connection_loss = False
        self.worker_send_task_events = True  # Flower can show workers and tasks
        self.task_time_limit = int(settings.turn_timeout_s) + 60  # a safety net behind the engine's deadline
        self.worker_hijack_root_logger = False
        self.task_default_queue = f"{settings.key_prefix}.default"


def make_celery(settings: Settings, name: str = "chat", *, worker: bool = False) -> Celery:
    """The app; `worker=True` adds what only a consuming worker uses: screened deliveries with a tag each and
    malformed messages answered (worker/celery_workarounds.py, which registers the `chat-redis` and
    `chat-sentinel` transports)."""
    app = Celery(name, set_as_current=False)
    app.config_from_object(CeleryConfig(settings))
    if worker:
        sentinel = "master_name" in app.conf.broker_transport_options  # CeleryConfig set it for a sentinel URL
        app.conf.broker_transport = "chat-sentinel" if sentinel else "chat-redis"
        app.conf.worker_consumer = "worker.celery_workarounds:GuardedConsumer"
    app.chat_settings = settings  # type: ignore[attr-defined]
    return app
