"""Prometheus metrics, computed from Redis: nothing needs the workers' cooperation.

Each API process follows the turns it enqueued (their hashes in Redis) and accounts for them when
/metrics is scraped: started (a worker began it), finished (by finish reason), failed, time to
first token (queued + prefill, from the turn's timings), total latency and tokens generated.
Queue depth is the length of each model's Celery list. Busy slots per worker are the running turns
per worker among those followed, or the worker's own liveness report (shared/cards.py WorkerReport,
which expires by itself when the worker is gone).
With several API processes, sum the counters across them (each follows its own turns).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.cards import WorkerReport
from shared.keys import Keys
from shared.wire import TurnResult

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
MAX_TRACKED = 50_000
disable_created_metrics()  # no *_created series: they double the exposition and say little here


class Tracker:
    """Turns this process enqueued and has not yet seen finish."""

    def __init__(self, metrics: Metrics, r: redis.Redis, keys: Keys):
        self.m = metrics
        self.r = r
        self.keys = keys
        self._turns: OrderedDict[str, tuple[str, bool]] = OrderedDict()  # turn id -> (model, started seen)
        self._lock = threading.Lock()
        self.running: dict[str, int] = {}  # worker -> running turns, as of the last poll

    def track(self, turn_id: str, model: str) -> None:
        with self._lock:
            self._turns[turn_id] = (model, False)
            while len(self._turns) > MAX_TRACKED:
                self._turns.popitem(last=False)

    def poll(self) -> None:
        with self._lock:
            items = list(self._turns.items())
            pipe = self.r.pipeline(transaction=False)
            for tid, _ in items:
                pipe.hmget(self.keys.turn(tid), "status", "attempt", "worker", "result")
            rows = pipe.execute() if items else []
            running: dict[str, int] = {}
            for (tid, (model, started)), (status, attempt, worker, result) in zip(items, rows):
                st = status.decode() if status else None
                if st is None:  # expired or deleted before we looked: nothing more to learn
                    del self._turns[tid]
                    continue
                if not started and attempt and int(attempt) > 0:
                    self.m.started.labels(model).inc()
                    self._turns[tid] = (model, True)
                if st == "running" and worker:
                    running[worker.decode()] = running.get(worker.decode(), 0) + 1
                elif st == "done" and result:
                    self._finish(model, TurnResult.model_validate_json(result))
                    del self._turns[tid]
                elif st == "failed":
                    self.m.failed.labels(model).inc()
                    del self._turns[tid]
            self.running = running

    def _finish(self, model: str, res: TurnResult) -> None:
        self.m.finished.labels(model, res.finish_reason.value).inc()
        self.m.ttft.labels(model).observe(res.timings.queued_s + res.timings.prefill_s)
        self.m.latency.labels(model).observe(res.timings.total_s)
        self.m.completion_tokens.labels(model).inc(res.completion_tokens)
        self.m.prompt_tokens.labels(model).inc(res.prompt_tokens)
        self.m.prefix_cache_hit_tokens.labels(model).inc(res.cached_tokens)
        with self.m.lock:
            hit, total = self.m.reuse.get(model, (0, 0))
            self.m.reuse[model] = (hit + res.cached_tokens, total + res.prompt_tokens)


class _Live(Collector):
    """Gauges read at scrape time."""

    def __init__(self, models: Callable[[], list[str]], depth: Callable[[str], int], busy: Callable[[], dict],
                 reuse: Callable[[], dict[str, tuple[int, int]]]):
        self.models, self.depth, self.busy, self.reuse = models, depth, busy, reuse

    def collect(self) -> Iterator[Metric]:
        q = GaugeMetricFamily("chat_queue_depth", "Turns waiting in the model's queue", labels=["model"])
        for m in self.models():
            q.add_metric([m], self.depth(m))
        yield q
        busy = GaugeMetricFamily("chat_worker_busy_slots", "Turns running on the worker", labels=["worker"])
        slots = GaugeMetricFamily("chat_worker_slots", "Slots the worker reports (when it reports)", labels=["worker"])
        for worker, (n, total) in sorted(self.busy().items()):
            busy.add_metric([worker], n)
            if total is not None:
                slots.add_metric([worker], total)
        yield busy
        yield slots
        ratio = GaugeMetricFamily("chat_prefix_cache_hit_ratio",
                                  "Prompt tokens reused from a worker's prefix cache / prompt tokens, since start",
                                  labels=["model"])
        for model, (hit, total) in sorted(self.reuse().items()):
            if total:
                ratio.add_metric([model], hit / total)
        yield ratio


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.started = Counter("chat_turns_started", "Turns a worker began", ["model"], registry=reg)
        self.finished = Counter("chat_turns_finished", "Turns answered", ["model", "finish_reason"], registry=reg)
        self.failed = Counter("chat_turns_failed", "Turns that failed", ["model"], registry=reg)
        self.ttft = Histogram("chat_time_to_first_token_seconds", "Enqueue to first token (queued + prefill)",
                              ["model"], buckets=LATENCY_BUCKETS, registry=reg)
        self.latency = Histogram("chat_turn_latency_seconds", "Enqueue to reply committed", ["model"],
                                 buckets=LATENCY_BUCKETS, registry=reg)
        self.completion_tokens = Counter("chat_tokens_generated", "Tokens generated", ["model"], registry=reg)
        self.prompt_tokens = Counter("chat_prompt_tokens", "Prompt tokens processed", ["model"], registry=reg)
        self.prefix_cache_hit_tokens = Counter(
            "chat_prefix_cache_hit_tokens", "Prompt tokens whose KV a worker reused instead of prefilling them",
            ["model"], registry=reg)
        self.lock = threading.Lock()
        self.reuse: dict[str, tuple[int, int]] = {}  # model -> (hit tokens, prompt tokens), for the ratio gauge
        self.rejected = Counter("chat_api_rejected", "Requests refused by admission control", ["reason"],
                                registry=reg)
        self.tracker: Tracker | None = None

    def bind(self, r: redis.Redis, keys: Keys, models: Callable[[], list[str]], depth: Callable[[str], int],
             workers: Callable[[], list[WorkerReport]]) -> None:
        self.tracker = Tracker(self, r, keys)
        self._workers = workers
        self.registry.register(_Live(models, depth, self.busy_slots, self._reuse))

    def _reuse(self) -> dict[str, tuple[int, int]]:
        with self.lock:
            return dict(self.reuse)

    def busy_slots(self) -> dict[str, tuple[int, int | None]]:
        assert self.tracker is not None
        out: dict[str, tuple[int, int | None]] = {w: (n, None) for w, n in self.tracker.running.items()}
        for rep in self._workers():
            out[rep.name] = (rep.busy, rep.slots)
        return out

    def scrape(self) -> None:
        """Bring the counters up to date; called by /metrics just before exposition."""
        assert self.tracker is not None
        self.tracker.poll()
