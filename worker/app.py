"""The worker's Celery app: the shared config object, the generate task, the pipeline step."""

from __future__ import annotations

from celery import Celery
from celery.utils.nodenames import default_nodename

from config.celery import make_celery, queue_name, worker_queue
from config.settings import Settings
from worker.runtime import RuntimeHolder
from worker.steps import PipelineStep
from worker.tasks import register_tasks


def make_worker_app(settings: Settings) -> Celery:
    """The app with its RuntimeHolder (`app.chat_runtime`), also handed to the broker transport (its
    channels screen deliveries against the attached pipeline: worker/celery_workarounds.py)."""
    from worker.celery_workarounds import HOLDER_OPTION, keep_transport  # registers chat-redis and chat-sentinel

    app = make_celery(settings, name="chat-worker", worker=True)
    app.conf.broker_failover_strategy = keep_transport(app.conf.broker_transport)  # a reconnect keeps it
    app.chat_runtime = RuntimeHolder()  # type: ignore[attr-defined]
    app.conf.broker_transport_options = {**app.conf.broker_transport_options, HOLDER_OPTION: app.chat_runtime}
    register_tasks(app)
    app.steps["worker"].add(PipelineStep)
    return app


def worker_options(settings: Settings, hostname: str | None = None, loglevel: str = "INFO") -> dict[str, object]:
    """Options for app.Worker / WorkController: a threads pool with one thread per engine slot, consuming
    this model's shared queue and the worker's own (config/celery.py worker_queue: where producers route
    the conversations whose KV cache it holds). `hostname` becomes the worker's name as Celery completes
    it (`name` -> `celery@name`; None -> `celery@HOST`), which names its own queue and its liveness report.
    On IPU the engine has more slots than the preset's micro-batch (one micro-batch per pipeline stage and
    replica): ipu.sizing.worker_slots counts them without compiling."""
    model, device = settings.model_preset(), settings.device_preset()
    slots = device.slots
    if device.backend == "ipu":
        from worker.pipeline.ipu.sizing import worker_slots  # poptorch is optional: import only here

        slots = worker_slots(device, model)
    name = default_nodename(hostname)  # what WorkController would make of it: the same name everywhere
    opts: dict[str, object] = {
        "pool": "threads",
        "concurrency": slots,
        "hostname": name,
        "queues": [queue_name(settings, model.name), worker_queue(settings, model.name, name)],
        "loglevel": loglevel,
        "prefetch_multiplier": 1,
        "without_mingle": True,
        "without_gossip": True,
    }
    return opts
