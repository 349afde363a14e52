"""What a worker process owns while it runs: the model pipeline, its engine, and its Redis plumbing.

Opened once at worker start (before any task is consumed), closed ("detached") once at stop. It is
kept in its worker app's RuntimeHolder (`app.chat_runtime`, worker/app.py), where the task (through its
base class), the consumer and the broker transport's delivery screen find it: no module global, so two
worker apps in one process (the tests' embedded workers) never see each other's pipeline.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
import torch

from config.celery import queue_name, worker_queue
from config.presets import DevicePreset, ModelPreset
from config.redis_clients import sync_client
from config.settings import Settings
from shared.arrivals import Arrivals
from shared.cards import HEARTBEAT_S, WorkerReport
from shared.keys import Keys
from shared.sampling import SamplingParams
from worker.engine.engine import Engine, Handle
from worker.engine.own_thread import start_on_own_thread
from worker.own_queue import OwnQueues
from worker.pipeline.backend import Backend
from worker.pipeline.factory import backend_dtype, build_backend, check_device
from worker.pipeline.loader import LoadedModel, load_model
from worker.presence import Presence, files_sha, model_card, tokenizer_files, workers_on_host
from worker.stream import StreamPublisher
from worker.turn_store import TurnStore
from worker.watchdog import Watchdog

log = logging.getLogger(__name__)


class Abandoned(Exception):
    """The worker is shutting down cold: the turn goes back to the queue, untouched."""


@dataclass
class Counters:
    """What this worker did with its turns, for its shutdown summary (task threads add to it)."""

    finished: int = 0  # turns answered (committed or failed with an answer)
    handed_back: int = 0  # turns returned to the queue for another worker
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def turn_finished(self) -> None:
        with self.lock:
            self.finished += 1

    def turn_handed_back(self) -> None:
        with self.lock:
            self.handed_back += 1


@dataclass
class Runtime:
    settings: Settings
    model: ModelPreset
    device: DevicePreset
    loaded: LoadedModel
    backend: Backend
    engine: Engine
    redis: redis.Redis
    keys: Keys
    turns: TurnStore
    publisher: StreamPublisher
    presence: Presence
    watchdog: Watchdog
    hostname: str
    counters: Counters = field(default_factory=Counters)
    detached: bool = False
    # Set once by a cold shutdown (or detach): no turn starts generating after it, and every turn in
    # the engine is abandoned, so its task hands it back to the queue instead of failing it.
    abandoning: bool = False
    _gate: threading.RLock = field(default_factory=threading.RLock, repr=False)
    # What is coming on this worker's queues (celery_workarounds._screen_reply asks when the engine is idle).
    arrivals: Arrivals = field(init=False, repr=False)
    # The queues it consumes: its model's shared queue (every turn's home) and its own (config/celery.py).
    home_queue: str = field(init=False)
    own_queue: str = field(init=False)

    def __post_init__(self) -> None:
        self.arrivals = Arrivals(self.redis, self.keys)
        self.home_queue = queue_name(self.settings, self.model.name)
        self.own_queue = worker_queue(self.settings, self.model.name, self.hostname)

    @classmethod
    def open(cls, settings: Settings, hostname: str) -> Runtime:
        model, device = settings.model_preset(), settings.device_preset()
        if settings.threads:
            warn_if_oversubscribed(settings.threads)
            torch.set_num_threads(settings.threads)
        r = sync_client(settings.redis_url, **settings.redis_options())
        r.ping()  # fail in seconds, not after a model load, when Redis is unreachable
        check_device(device)  # ... or when the device is missing
        t0 = time.perf_counter()
        log.info(
            "loading model %s for device %s (%d slots, sequence length %d)",
            model.name,
            device.name,
            device.slots,
            model.sequence_length,
        )

        def attach() -> tuple[Engine, tuple[LoadedModel, Backend]]:
            """On the engine's own thread: all tensor work on one thread (own_thread.py)."""
            loaded = load_model(model, backend_dtype(device), settings.weights_cache)
            backend = build_backend(device, loaded, model.sequence_length)
            try:
                backend.warm_up()
                engine = Engine(backend, loaded.codec, device=device.device if device.backend == "torch" else "cpu")
                return engine, (loaded, backend)
            except BaseException:
                backend.detach()
                log.info("start failed: released the device")
                raise

        engine, (loaded, backend) = start_on_own_thread(attach)
        try:  # a start that fails (or is interrupted by a stop signal) past this point releases the device
            keys = Keys(settings.key_prefix)
            replication = settings.replication()
            turns = TurnStore(
                r,
                keys,
                stream_maxlen=settings.stream_maxlen,
                stream_ttl_s=settings.stream_ttl_s,
                max_attempts=settings.max_attempts,
                worker=hostname,
                result_ttl_s=settings.result_ttl_s,
                lease_s=settings.lease_s,
                replication=replication,
            )
            files = tokenizer_files(loaded.tokenizer)
            card = model_card(model.name, loaded.codec, engine.max_len, model.end_keys, files_sha(files))
            report = WorkerReport(name=hostname, model=model.name, sequence_length=engine.max_len,
                                  slots=len(engine.slots), host=socket.gethostname(), pid=os.getpid(),
                                  started_at=time.time(), own_queue=True)
            presence = Presence(r, keys, report)
            presence.publish_card(card, files)
            presence.heartbeat(0)
            if device.device == "cpu" and not settings.threads:
                warn_if_sharing_cores(r, keys, report)
            publisher = StreamPublisher(r, keys, flush_ms=settings.stream_flush_ms, maxlen=settings.stream_maxlen,
                                        lease_s=settings.lease_s, replication=replication)
            publisher.heartbeat = lambda: None if presence.withdrawn else presence.heartbeat(engine.busy)
            publisher.heartbeat_s = HEARTBEAT_S
            publisher.start()
            watchdog = Watchdog(turns, lease_s=settings.lease_s, lost_after_s=settings.lost_after_s,
                                own_queues=OwnQueues(r, settings, model.name)).start()
        except BaseException:
            engine.stop()
            backend.detach()
            log.info("start failed: released the device")
            raise
        log.info(
            "pipeline attached in %.1fs; serving %s with %d slots; %s",
            time.perf_counter() - t0,
            model.name,
            len(engine.slots),
            prefix_cache_line(backend),
        )
        if not device.prefix_cache and settings.prefix_cache_slots:
            log.warning("CHAT_PREFIX_CACHE_SLOTS=%d has no effect: the prefix cache is off",
                        settings.prefix_cache_slots)
        return cls(settings, model, device, loaded, backend, engine, r, keys, turns, publisher, presence, watchdog,
                   hostname)

    def submit(self, prompt: list[int], params: SamplingParams, max_new: int, deadline: float | None,
               on_text: Callable[[str], None] | None = None) -> Handle:
        """Start generating (Engine.submit), unless the worker is abandoning its turns (then raise Abandoned)."""
        with self._gate:
            if self.abandoning:
                raise Abandoned("worker shutting down")
            return self.engine.submit(prompt, params, max_new, deadline, on_text)

    def abandon(self, reason: str) -> int:
        """Cold shutdown: refuse new turns and abandon those generating (each is handed back).
        Safe from a signal handler and from any thread; returns how many were abandoned."""
        with self._gate:
            self.abandoning = True
            return self.engine.abandon_all(reason)

    def withdraw(self) -> None:
        """Stop reporting this worker as live (it takes no new turns): producers stop counting on it and
        route nothing more to its own queue, and what waits there goes to the shared queue now, not when
        its liveness would have expired. Called once the consumer has stopped (Lifecycle.shutdown, detach);
        idempotent."""
        try:
            self.presence.withdraw()
        except redis.RedisError:
            pass  # the report expires by its TTL anyway
        try:
            own = self.watchdog.own_queues
            moved = own.hand_home(self.hostname, force=True).moved if own is not None else 0
            if moved:
                log.info("handed %d turn(s) waiting on this worker's own queue to the shared queue", moved)
        except redis.RedisError:
            log.warning("could not hand this worker's own queue home: the other workers' watchdogs will, once "
                        "its liveness expires")

    def detach(self) -> None:
        """Release the device. Idempotent; logs one summary line."""
        with self._gate:
            if self.detached:
                return
            self.detached = True
            self.abandoning = True
        t0 = time.perf_counter()
        self.engine.stop()
        self.watchdog.stop()
        self.publisher.stop()
        self.backend.detach()
        self.withdraw()
        log.info(
            "detached pipeline: turns finished=%d, turns handed back=%d, detach took %.2fs",
            self.counters.finished,
            self.counters.handed_back,
            time.perf_counter() - t0,
        )


def prefix_cache_line(backend: Backend) -> str:
    """What the start-up log says about prefix reuse: off, or its spare rows and the KV cache's size."""
    if not getattr(backend, "prefix_reuse", False):
        return "prefix cache off"
    cache = getattr(backend, "cache", None)
    tensors = [*getattr(cache, "k", []), *getattr(cache, "v", [])]
    size = sum(t.numel() * t.element_size() for t in tensors)
    return (f"prefix cache on: {backend.spare_slots} spare row(s) beside the slots, KV cache {size / 2**20:.0f} MiB "
            "in all")


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask: a container's or taskset's share of the host)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def warn_if_oversubscribed(threads: int) -> bool:
    """Warn (and say so) when `threads` exceeds the cores this process may run on: OpenMP threads past the
    cores only take turns on them, and every step waits for the slowest."""
    cores = usable_cores()
    if threads <= cores:
        return False
    log.warning("CHAT_THREADS=%d is more than the %d cores this process may use: set at most %d", threads, cores,
                cores)
    return True


def warn_if_sharing_cores(r: redis.Redis, keys: Keys, me: WorkerReport) -> None:
    """Torch's default is one thread per core for each process: two CPU workers on one host then fight
    over every core and both run many times slower (12x for two smollm2 workers on 2 cores, measured)."""
    others = [w for w in workers_on_host(r, keys, me.host) if w.name != me.name]
    if others:
        cores = usable_cores()
        log.warning(
            "%d other worker(s) run on this host (%s) and CHAT_THREADS is unset: every worker uses all %d cores "
            "and they slow each other down; set CHAT_THREADS to about cores / workers (%d here) on each",
            len(others), ", ".join(w.name for w in others), cores, max(1, cores // (len(others) + 1)),
        )


class RuntimeHolder:
    """A worker app's Runtime while its pipeline is attached (`runtime`, None before and after). Made with
    the app, set by the pipeline step (worker/lifecycle.py), read by the task, the consumer and the broker
    transport (which gets it through its transport options)."""

    def __init__(self) -> None:
        self.runtime: Runtime | None = None

    def current(self) -> Runtime:
        """The attached Runtime. Raises RuntimeError when none is (a task called outside a started worker)."""
        if self.runtime is None:
            raise RuntimeError("no pipeline is attached to this worker app (was it started with its step?)")
        return self.runtime
