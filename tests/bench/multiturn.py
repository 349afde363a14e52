"""Section 5: the multi-turn workload (issue 14) through the real stack, prefix cache off and on, 1 and 3 workers.

Each configuration gets a fresh private redis-server, its worker processes (`python -m worker`, SmolLM2-135M
on the `cpu` preset) and one API process; the bench process is 16 HTTP clients, one per conversation of
tests/bench/multiturn_workload.py, each sending its turns one after another as streaming stateless
`/v1/chat/completions` requests that resend the whole history (greedy, replies capped at 64 tokens), so
the conversations interleave on the workers. Configurations:

* 1 worker (2 torch threads), cache off (`CHAT_PREFIX_CACHE=false`) and on (the default: 8 spare rows);
* 3 workers (1 thread each: 3 processes on this machine's cores), cache on, routed through the model's
  shared queue alone (`CHAT_ROUTING=shared`) and cache-aware (the default).

Per turn: TTFT = request sent -> first content delta read; prompt and cached (reused) tokens from the
final usage chunk (`prompt_tokens_details.cached_tokens`); the worker that served it from the turn's
record. Reported per configuration: TTFT p50/p95 per turn index, prompt tokens prefilled vs reused, and
how many conversations stayed on one worker.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any

from tests.bench.common import log, pct, rnd
from tests.bench.multiturn_workload import REPLY_MAX_TOKENS, Conversation, describe, history, workload

MODEL = "smollm2-135m"
DEVICE = "cpu"
TTFT_RATIO_TARGET = 1.5  # TTFT p50 at turns 9-12 <= this x turn 1's, cache on
REUSE_TARGET = 0.85  # prompt tokens reused with 3 workers and cache-aware routing


@dataclass(frozen=True)
class Config:
    """One run of the workload: how many workers, the prefix cache on or off, and the producer's routing."""

    label: str
    workers: int
    prefix_cache: bool
    routing: str  # CHAT_ROUTING: cache_aware | shared

    @property
    def threads(self) -> int:
        return 2 if self.workers == 1 else 1


CONFIGS = (
    Config("1_worker_cache_off", 1, False, "cache_aware"),
    Config("1_worker_cache_on", 1, True, "cache_aware"),
    Config("3_workers_shared_queue", 3, True, "shared"),
    Config("3_workers_cache_aware", 3, True, "cache_aware"),
)


@dataclass
class Turn:
    conversation: int
    index: int  # turn index from 0
    ttft_ms: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    turn_id: str | None = None
    worker: str | None = None
    reply: str = ""
    error: str | None = None


def chat_turn(client: Any, base_url: str, messages: list[dict[str, str]], turn: Turn) -> None:
    """One streaming stateless request, read by tests/bench/http.py's stream_chat; fills `turn` (errors are
    kept in it, for the caller to report)."""
    from tests.bench.http import Req, stream_chat

    body = {"model": MODEL, "messages": messages, "stream": True, "stream_options": {"include_usage": True},
            "temperature": 0.0, "max_tokens": REPLY_MAX_TOKENS}
    req = stream_chat(client, base_url, body, Req(f"conversation {turn.conversation} turn {turn.index}"),
                      usage_required=False)
    turn.ttft_ms = None if req.ttft is None else req.ttft * 1e3
    turn.prompt_tokens, turn.cached_tokens = req.prompt_tokens or 0, req.cached_tokens or 0
    turn.turn_id, turn.reply, turn.error = req.turn_id, req.text, req.error


def drive(base_url: str, conversations: list[Conversation]) -> list[Turn]:
    """Every conversation on its own thread, its turns one after another (each resends the history with the
    replies this server gave). Returns every turn, in the order they ended."""
    import httpx

    done: list[Turn] = []
    lock = threading.Lock()
    limits = httpx.Limits(max_connections=len(conversations) + 4, max_keepalive_connections=len(conversations) + 4)
    with httpx.Client(timeout=httpx.Timeout(900, connect=10), limits=limits) as client:

        def converse(i: int) -> None:
            replies: list[str] = []
            for t in range(len(conversations[i].user_messages)):
                turn = Turn(i, t)
                chat_turn(client, base_url, history(conversations[i], t, replies), turn)
                with lock:
                    done.append(turn)
                if turn.error:
                    return
                replies.append(turn.reply)

        threads = [threading.Thread(target=converse, args=(i,), daemon=True) for i in range(len(conversations))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    return done


def summarize(turns: list[Turn], wall_s: float) -> dict[str, Any]:
    """TTFT p50/p95 per turn index, prompt tokens prefilled vs reused, conversations that kept one worker."""
    by_index: dict[int, list[float]] = {}
    for t in turns:
        if t.ttft_ms is not None:
            by_index.setdefault(t.index, []).append(t.ttft_ms)
    prompt = sum(t.prompt_tokens for t in turns)
    cached = sum(t.cached_tokens for t in turns)
    workers: dict[int, set[str]] = {}
    for t in turns:
        if t.worker:
            workers.setdefault(t.conversation, set()).add(t.worker)
    first = by_index.get(0, [])
    late = [x for i, xs in by_index.items() if i >= 8 for x in xs]  # turns 9-12
    return {
        "turns": len(turns),
        "errors": [t.error for t in turns if t.error][:5],
        "wall_s": rnd(wall_s),
        "ttft_ms_by_turn": {str(i + 1): {"p50": rnd(pct(xs, 50)), "p95": rnd(pct(xs, 95)), "n": len(xs)}
                            for i, xs in sorted(by_index.items())},
        "ttft_ms_p50_turn_1": rnd(median(first)) if first else None,
        "ttft_ms_p50_turns_9_12": rnd(median(late)) if late else None,
        "late_over_first": rnd(median(late) / median(first), 2) if first and late else None,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "prefilled_tokens": prompt - cached,
        "reuse": rnd(cached / prompt, 3) if prompt else None,
        "conversations_on_one_worker": sum(len(ws) == 1 for ws in workers.values()),
        "conversations": len(workers),
    }


def run_config(cfg: Config, conversations: list[Conversation]) -> dict[str, Any]:
    """Start Redis, cfg.workers workers and an API; drive the workload through them; stop everything."""
    import redis

    from tests.bench.stack import PrivateRedis
    from tests.procs import ApiProcess, WorkerProcess

    log_dir = Path(tempfile.mkdtemp(prefix=f"bench-multiturn-{cfg.label}-"))
    priv = PrivateRedis()
    workers: list[WorkerProcess] = []
    api: ApiProcess | None = None
    ok = False
    try:
        env = {"CHAT_MODEL": MODEL, "CHAT_DEVICE": DEVICE, "CHAT_SLOTS": "8", "CHAT_THREADS": str(cfg.threads),
               "CHAT_PREFIX_CACHE": str(cfg.prefix_cache).lower(), "TQDM_DISABLE": "1"}
        workers = [WorkerProcess(priv.url, f"mt-{i}", log_dir, **env) for i in range(cfg.workers)]
        for w in workers:
            w.wait_ready(timeout=600)
        api = ApiProcess(priv.url, log_dir, CHAT_ROUTING=cfg.routing, CHAT_RATE_LIMIT_BURST="100000")
        log(f"multiturn {cfg.label}: {cfg.workers} worker(s) ready; {len(conversations)} conversations")
        t0 = time.perf_counter()
        turns = drive(api.url, conversations)
        wall = time.perf_counter() - t0
        r = redis.Redis.from_url(priv.url, decode_responses=True)
        for t in turns:  # which worker served it, from the turn's record (outside the timings)
            if t.turn_id:
                t.worker = r.hget(f"chat:turn:{t.turn_id}", "worker") or _result_worker(r, t.turn_id)
        r.close()
        out = {"workers": cfg.workers, "threads_per_worker": cfg.threads, "prefix_cache": cfg.prefix_cache,
               "routing": cfg.routing, **summarize(turns, wall)}
        log(f"multiturn {cfg.label}: TTFT p50 turn 1 {out['ttft_ms_p50_turn_1']} ms, turns 9-12 "
            f"{out['ttft_ms_p50_turns_9_12']} ms; reuse {out['reuse']}; {wall:.0f} s")
        ok = not out["errors"]
        return out
    finally:
        if api is not None:
            api.stop()
        for w in workers:
            w.stop()
        priv.close()
        if ok:
            shutil.rmtree(log_dir, ignore_errors=True)
        else:
            log(f"multiturn {cfg.label}: logs kept in {log_dir}")


def _result_worker(r: Any, turn_id: str) -> str | None:
    raw = r.hget(f"chat:turn:{turn_id}", "result")
    return json.loads(raw).get("worker") if raw else None


def run(*, conversations: int = 16, turns: int = 12, configs: tuple[Config, ...] = CONFIGS) -> dict[str, Any]:
    """Every configuration in turn, one at a time, with a pause between (the machine settles)."""
    convs = workload(conversations, turns)
    out: dict[str, Any] = {"model": MODEL, "device_preset": DEVICE, "workload": describe(conversations, turns)}
    for i, cfg in enumerate(configs):
        if i:
            time.sleep(5)
        out[cfg.label] = run_config(cfg, convs)
    on, off = out.get("1_worker_cache_on"), out.get("1_worker_cache_off")
    aware = out.get("3_workers_cache_aware")
    out["targets"] = {
        "late_over_first_cache_on": {"value": on and on["late_over_first"], "target": TTFT_RATIO_TARGET,
                                     "met": bool(on and on["late_over_first"] is not None
                                                 and on["late_over_first"] <= TTFT_RATIO_TARGET)},
        "reuse_3_workers_cache_aware": {"value": aware and aware["reuse"], "target": REUSE_TARGET,
                                        "met": bool(aware and aware["reuse"] is not None
                                                    and aware["reuse"] >= REUSE_TARGET)},
        "cache_off_late_over_first": off and off["late_over_first"],
    }
    return out
