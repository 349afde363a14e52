"""Section 2: the whole stack on a real Redis: producer (ChatClient) -> Celery/Redis -> a worker
subprocess (`python -m worker`, tests/procs.py) -> Redis Streams -> the client reading deltas.

* Queue overhead: per turn, (first streamed text read by the client) - (task.enqueued_at) - (the
  engine's prefill_s from the turn's TurnResult): everything the stack adds before the first token
  shows, with the model's own prompt processing taken out. Turns run one after another.
* Redis commands per generated token, at N concurrent streams (a worker with CHAT_SLOTS=N):
  server side from INFO deltas (total_commands_processed and commandstats, which both count the
  commands run inside Lua scripts, see `lua_probe`), client side from redis-py instrumented in the
  bench process and in the worker (round trips = socket writes; a pipeline or a script call is one).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tests.bench import redis_count
from tests.bench.common import ROOT, log, pct, rnd
from tests.bench.cpu import QUESTIONS

DEFAULT_URL = "redis://127.0.0.1:6379/13"


# -- Redis helpers -------------------------------------------------------------------------------------
def server_counts(r: Any) -> dict[str, Any]:
    """One INFO call: the server's command counters (server-wide, all clients, all dbs)."""
    redis_count.set_role("meta")
    try:
        info = r.info("all")
    finally:
        redis_count.set_role(None)
    calls = {k.removeprefix("cmdstat_"): v["calls"] for k, v in info.items() if k.startswith("cmdstat_")}
    return {"total": int(info["total_commands_processed"]), "calls": calls, "at": time.time()}


def server_diff(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """Commands between two snapshots, less the one INFO that took `before` (counted after it ran)."""
    calls = {k: v - before["calls"].get(k, 0) for k, v in after["calls"].items()}
    calls = {k: v for k, v in calls.items() if v}
    if calls.get("info"):
        calls["info"] -= 1
        if not calls["info"]:
            del calls["info"]
    return {
        "total_commands_processed": after["total"] - before["total"] - 1,
        "commandstats_calls": sum(calls.values()),
        "by_command": dict(sorted(calls.items(), key=lambda kv: -kv[1])),
    }


def lua_probe(r: Any) -> dict[str, Any]:
    """The small experiment: does the server count commands run inside a script? One EVAL that runs
    three commands; one MULTI/EXEC pipeline of two (one round trip, four commands). Best of three
    tries (other clients of a shared server can only add to the counts)."""
    script = "redis.call('SET', KEYS[1], '1'); redis.call('INCR', KEYS[1]); redis.call('DEL', KEYS[1]); return 1"
    evals, pipes = [], []
    for _ in range(3):
        a = server_counts(r)
        c0 = redis_count.snapshot()
        r.eval(script, 1, "bench:lua-probe")
        c1 = redis_count.snapshot()
        b = server_counts(r)
        d = server_diff(b, a)
        cd = redis_count.diff(c1, c0)
        evals.append((d["total_commands_processed"], d["commandstats_calls"], sum(cd["round_trips"].values())))
        a = server_counts(r)
        c0 = redis_count.snapshot()
        p = r.pipeline(transaction=True)
        p.set("bench:lua-probe", 1)
        p.delete("bench:lua-probe")
        p.execute()
        c1 = redis_count.snapshot()
        b = server_counts(r)
        d = server_diff(b, a)
        cd = redis_count.diff(c1, c0)
        pipes.append(
            (
                d["total_commands_processed"],
                d["commandstats_calls"],
                sum(cd["round_trips"].values()),
                sum(cd["commands"].values()),
            )
        )
    e, p = min(evals), min(pipes)
    return {
        "eval_with_3_inner_commands": {
            "client_round_trips": e[2],
            "server_total_commands_processed": e[0],
            "server_commandstats_calls": e[1],
            "lua_inner_counted_by_total_commands_processed": e[0] >= 4,
            "lua_inner_counted_by_commandstats": e[1] >= 4,
        },
        "multi_exec_pipeline_of_2": {
            "client_round_trips": p[2],
            "client_commands": p[3],
            "server_total_commands_processed": p[0],
            "server_commandstats_calls": p[1],
        },
    }


def foreign_clients(r: Any, db: int, within_s: float) -> list[dict[str, str]]:
    """Clients of other dbs that ran a command within the last `within_s`: their commands are in the
    server-wide counters too."""
    redis_count.set_role("meta")
    try:
        clients = r.client_list()
    finally:
        redis_count.set_role(None)
    out = []
    for c in clients:
        if int(c.get("db", -1)) != db and int(c.get("idle", 1e9)) <= within_s and c.get("cmd") != "client|list":
            out.append({k: c.get(k, "") for k in ("addr", "db", "idle", "cmd", "name")})
    return out


class PrivateRedis:
    """A throw-away redis-server on a free port (--private-redis): server counters are all ours."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if not exe:
            raise RuntimeError("--private-redis: no redis-server on PATH")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        import redis

        end = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > end:
                    self.close()
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


# -- the runs -------------------------------------------------------------------------------------------
def _turn_latency(client: Any, model: str, question: str, params: Any) -> dict[str, Any]:
    cid = client.create_conversation(model)
    task = client.send(cid, question, params)
    sent = time.time()
    first = result = None
    done_at = 0.0
    for ev in client.events(task.turn_id, timeout=120):
        if first is None and ((ev.kind == "delta" and ev.text) or ev.kind == "done"):
            first = time.time()
        if ev.kind == "error":
            raise RuntimeError(f"turn failed: {ev.error}")
        if ev.kind == "done":
            result, done_at = ev.result, time.time()
    assert result is not None and first is not None
    t = result.timings
    to_first = first - task.enqueued_at
    return {
        "send_ms": (sent - task.enqueued_at) * 1e3,
        "pickup_ms": t.queued_s * 1e3,
        "prefill_ms": t.prefill_s * 1e3,
        "to_first_ms": to_first * 1e3,
        "overhead_ms": (to_first - t.prefill_s) * 1e3,
        "after_pickup_ms": (to_first - t.queued_s - t.prefill_s) * 1e3,
        # The first text came with the final commit (its tail and `done` in one read), not from the
        # stream flusher: the turn was shorter than the flush interval, which hides the flush wait.
        "first_with_commit": done_at - first < 0.002,
        "tokens": result.completion_tokens,
    }


def latency(client: Any, model: str, turns: int, warm: int, tokens: int) -> dict[str, Any]:
    from shared.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=tokens)
    for i in range(warm):
        _turn_latency(client, model, QUESTIONS[i % len(QUESTIONS)], params)
    rows = [_turn_latency(client, model, QUESTIONS[i % len(QUESTIONS)], params) for i in range(turns)]
    out: dict[str, Any] = {"turns": turns, "warm_up_turns": warm, "max_tokens": tokens}
    for key in ("overhead_ms", "pickup_ms", "after_pickup_ms", "send_ms", "prefill_ms", "to_first_ms"):
        vals = [r[key] for r in rows]
        out[key] = {"p50": rnd(pct(vals, 50), 2), "p95": rnd(pct(vals, 95), 2), "max": rnd(max(vals), 2)}
    out["first_text_with_final_commit"] = sum(r["first_with_commit"] for r in rows)
    out["turn_tokens_min_max"] = [min(r["tokens"] for r in rows), max(r["tokens"] for r in rows)]
    out["target_p50_ms"] = 10.0
    out["meets_target"] = out["overhead_ms"]["p50"] <= 10.0
    return out


def _client_totals(bench: dict[str, Any], worker: dict[str, Any]) -> dict[str, Any]:
    roles: dict[str, dict[str, int]] = {}
    for src in (bench, worker):
        for kind in ("round_trips", "commands"):
            for role, n in src.get(kind, {}).items():
                if role == "meta":
                    continue
                roles.setdefault(role, {"round_trips": 0, "commands": 0})[kind] += n
    total = {
        "round_trips": sum(v["round_trips"] for v in roles.values()),
        "commands": sum(v["commands"] for v in roles.values()),
    }
    return {"by_role": roles, "total": total}


def _concurrent_round(client: Any, convs: list[str], tokens: int) -> tuple[list[Any], float]:
    """One turn on each conversation, all sent at once by this thread (role producer), each read by its
    own thread (role reader). Returns the TurnResults and the wall time from the first send."""
    from shared.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=tokens)
    results: list[Any] = [None] * len(convs)
    errors: list[str] = []

    def read(i: int, turn_id: str) -> None:
        redis_count.set_role("reader")
        try:
            for ev in client.events(turn_id, timeout=600):
                if ev.kind == "done":
                    results[i] = ev.result
                elif ev.kind == "error":
                    errors.append(ev.error or "error")
        except Exception as e:  # reported below
            errors.append(repr(e))

    t0 = time.perf_counter()
    threads = []
    redis_count.set_role("producer")
    try:
        for i, cid in enumerate(convs):
            task = client.send(cid, QUESTIONS[i % len(QUESTIONS)], params)
            th = threading.Thread(target=read, args=(i, task.turn_id), daemon=True)
            th.start()
            threads.append(th)
    finally:
        redis_count.set_role(None)
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    if errors or any(x is None for x in results):
        raise RuntimeError(f"{len(errors)} concurrent turn(s) failed: {errors[:1]}")
    return results, wall


def commands_per_token(
    client: Any, r: Any, db: int, count_file: Path, model: str, n: int, tokens: int, idle_s: float
) -> dict[str, Any]:

    # Warm-up round (excluded): the worker's task threads and the client's connection pool grow to
    # n connections here, as they would be in a producer that has been serving for a while.
    _concurrent_round(client, [client.create_conversation(model) for _ in range(n)], 4)
    convs = [client.create_conversation(model) for _ in range(n)]

    # The idle background: what the worker and its Celery consumer do with nothing to serve.
    time.sleep(0.3)
    s0, c0, w0 = server_counts(r), redis_count.snapshot(), redis_count.read_file(count_file)
    time.sleep(idle_s)
    s1, c1, w1 = server_counts(r), redis_count.snapshot(), redis_count.read_file(count_file)
    idle = {
        "seconds": idle_s,
        "server": server_diff(s1, s0),
        "client": _client_totals(redis_count.diff(c1, c0), redis_count.diff(w1, w0)),
    }

    s0, c0, w0 = server_counts(r), redis_count.snapshot(), redis_count.read_file(count_file)
    t0 = time.perf_counter()
    results, wall = _concurrent_round(client, convs, tokens)
    time.sleep(0.5)  # the worker's acks and result writes after the last commit; its counter dump
    window = time.perf_counter() - t0
    s1, c1, w1 = server_counts(r), redis_count.snapshot(), redis_count.read_file(count_file)
    foreign = foreign_clients(r, db, window)

    toks = [x.completion_tokens for x in results]
    gen = sum(toks)
    server = server_diff(s1, s0)
    client_side = _client_totals(redis_count.diff(c1, c0), redis_count.diff(w1, w0))
    ct = client_side["total"]
    out: dict[str, Any] = {
        "concurrent_turns": n,
        "max_tokens": tokens,
        "generated_tokens": gen,
        "completion_tokens_min_max": [min(toks), max(toks)],
        "wall_s": round(wall, 2),
        "window_s": round(window, 2),
        "tok_s_total": rnd(gen / wall, 1),
        "server": server,
        "client": client_side,
        "per_token": {
            "server_commands_executed_incl_lua": rnd(server["total_commands_processed"] / gen, 3),
            "client_commands_sent": rnd(ct["commands"] / gen, 3),
            "client_round_trips": rnd(ct["round_trips"] / gen, 3),
            "by_role_round_trips": {k: rnd(v["round_trips"] / gen, 3) for k, v in client_side["by_role"].items()},
            "by_role_commands": {k: rnd(v["commands"] / gen, 3) for k, v in client_side["by_role"].items()},
        },
        "per_turn": {
            "server_commands_executed_incl_lua": rnd(server["total_commands_processed"] / n, 1),
            "client_commands_sent": rnd(ct["commands"] / n, 1),
            "client_round_trips": rnd(ct["round_trips"] / n, 1),
            "by_role_round_trips": {k: rnd(v["round_trips"] / n, 1) for k, v in client_side["by_role"].items()},
        },
        # Executed on the server but not sent by any of our clients: commands inside Lua scripts
        # (plus any other client's, when foreign_clients_active is not empty).
        "server_minus_client_commands": server["total_commands_processed"] - ct["commands"],
        "foreign_clients_active": foreign,
        "idle_background": idle,
    }
    return out


def run(
    *,
    quick: bool,
    url: str | None,
    private_redis: bool,
    model: str,
    turns: int,
    flush_list: list[int],
    concurrent: int,
    conc_tokens: int,
    lat_tokens: int,
) -> dict[str, Any]:
    import redis

    from config.settings import Settings, load_settings
    from producer.client import ChatClient
    from tests.procs import WorkerProcess

    redis_count.install(default_role="bench")
    priv = PrivateRedis() if private_redis else None
    url = priv.url if priv else (url or os.environ.get("REDIS_URL") or DEFAULT_URL)
    r = redis.Redis.from_url(url)
    db = int(r.connection_pool.connection_kwargs.get("db", 0))
    out: dict[str, Any] = {"redis_url": url, "private_redis": bool(priv), "model": model, "runs": []}
    log_dir = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    try:
        r.ping()
        if db == 0 and not priv:
            raise RuntimeError(f"{url}: refusing to flush db 0 of a shared server; use another db (e.g. /13)")
        out["redis_version"] = r.info("server")["redis_version"]
        n_keys = r.dbsize()
        if n_keys:
            log(f"flushing db {db} of {url} ({n_keys} keys)")
        r.flushdb()
        out["lua_probe"] = lua_probe(r)
        for flush_ms in flush_list:
            count_file = log_dir / f"worker-{flush_ms}ms-redis-count.json"
            env = {
                "CHAT_MODEL": model,
                "CHAT_SLOTS": str(concurrent),
                "CHAT_STREAM_FLUSH_MS": str(flush_ms),
                "CHAT_THREADS": "1" if model == "tiny-neox" else str(os.cpu_count() or 1),
                "PYTHONPATH": os.pathsep.join(
                    [str(redis_count.SITE_DIR), str(ROOT)]
                    + ([os.environ["PYTHONPATH"]] if "PYTHONPATH" in os.environ else [])
                ),
                redis_count.ENV_FILE: str(count_file),
            }
            log(f"stack: starting a worker ({model}, {concurrent} slots, stream flush {flush_ms} ms) on {url}")
            t0 = time.perf_counter()
            w = WorkerProcess(url, f"bench-{flush_ms}ms", log_dir, **env)
            client = None
            try:
                w.wait_ready(timeout=300)
                ready_s = time.perf_counter() - t0
                settings: Settings = load_settings(redis_url=url, model=model)
                client = ChatClient(settings)
                run_out: dict[str, Any] = {"stream_flush_ms": flush_ms, "worker_ready_s": round(ready_s, 1)}
                log(f"stack: {turns} sequential turns (flush {flush_ms} ms)")
                run_out["latency"] = latency(client, model, turns, warm=3 if quick else 10, tokens=lat_tokens)
                lat = run_out["latency"]["overhead_ms"]
                log(f"stack: queue overhead p50 {lat['p50']} ms, p95 {lat['p95']} ms")
                log(f"stack: {concurrent} concurrent turns of {conc_tokens} tokens")
                run_out["commands"] = commands_per_token(
                    client, r, db, count_file, model, concurrent, conc_tokens, idle_s=1.0 if quick else 3.0
                )
                pt = run_out["commands"]["per_token"]
                log(
                    f"stack: per token: {pt['server_commands_executed_incl_lua']} commands executed, "
                    f"{pt['client_round_trips']} client round trips"
                )
                out["runs"].append(run_out)
            except Exception:
                log(f"stack: worker log ({w.log_path}):\n{w.log()[-3000:]}")
                raise
            finally:
                if client is not None:
                    client.close()
                w.stop()
                r.flushdb()
    finally:
        try:
            r.flushdb()
        except redis.RedisError:
            pass
        r.close()
        if priv:
            priv.close()
    shutil.rmtree(log_dir, ignore_errors=True)
    return out
