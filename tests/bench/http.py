"""Section 4: the HTTP serving path, beside the engine alone (section 1) of the same run.

A private redis-server, one worker subprocess (`python -m worker`, SmolLM2-135M on the `cpu` preset, 8
slots, as many torch threads as section 1's engine had) and one API subprocess (`python -m producer.api`,
auth off) are started; the bench process is the HTTP client. Streaming `/v1/chat/completions` requests
(greedy, `max_tokens` = section 1's new tokens, `stream_options.include_usage`) are sent with httpx and
their SSE lines read as they arrive:

* 1 client: requests one after another, cycling through section 1's questions;
* 8 clients: rounds of 8 requests sent at once (one thread each), the 8 questions of section 1's
  `8 together`.

Per request: TTFT = request sent -> first non-empty content delta read; completion tokens from the final
usage chunk; end = the chunk with the finish reason read. Like section 1 (unless --respect-eos), requests
set `ignore_eos` (the API's extension, vLLM's name) so each reply has exactly max_tokens tokens; tokens/s
are computed from the completion tokens each reply really had either way.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

from producer.embedded import free_port
from tests.bench.common import ROOT, log, pct, rnd, wait_http_ok
from tests.bench.cpu import MODEL, QUESTIONS

DEVICE = "cpu"  # the preset section 1 compares against the baseline first (int8)
SLOTS = 8
CLIENTS = 8  # as section 1's `8 together`
# Targets, against the engine alone (section 1, preset `cpu`) in the same run.
TTFT_TARGET_MS = {"1_client": 25.0, "8_clients": 50.0}  # HTTP TTFT p50 - engine TTFT p50 <= this
TOK_S_TARGET_RATIO = 0.95  # HTTP tok/s total at 8 clients / engine's 8 together >= this
ENGINE_SCENARIO = {"1_client": "1_stream", "8_clients": "8_together"}


@dataclass
class Req:
    question: str
    sent: float = 0.0
    first: float | None = None  # first non-empty content delta read
    end: float | None = None  # the chunk with the finish reason read
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    sent_wall: float = 0.0  # time.time() at `sent`: the turn record's and the stream's clock
    turn_id: str | None = None  # from the chunks' id (chatcmpl-<turn id>)
    stages: dict[str, float] | None = None  # where the TTFT went (ms), from the turn's record: see stage_times
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, where the server reports it
    usage_reported: bool = False  # a usage chunk was read
    done: bool = False  # `data: [DONE]` was read
    parts: list[str] = field(default_factory=list)  # the content deltas, in order

    @property
    def chars(self) -> int:
        return sum(map(len, self.parts))

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.sent

    def row(self) -> dict[str, Any]:
        return {
            "question": self.question,
            "ttft_ms": rnd(self.ttft * 1e3 if self.ttft is not None else None, 1),
            "duration_ms": rnd((self.end - self.sent) * 1e3 if self.end else None, 1),
            "completion_tokens": self.completion_tokens,
            "prompt_tokens": self.prompt_tokens,
            "finish_reason": self.finish_reason,
            "chars": self.chars,
            "stages_ms": self.stages,
        }


def body(question: str, max_tokens: int, ignore_eos: bool) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": question}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.0,
        "max_tokens": max_tokens,
        "ignore_eos": ignore_eos,
    }


def stream_chat(client: Any, base_url: str, payload: dict[str, Any], req: Req,
                start: threading.Barrier | None = None, *, usage_required: bool = True) -> Req:
    """The benches' one reader of a streaming `/v1/chat/completions` request (this API, vLLM's, llama.cpp's):
    sends `payload` (after `start`, when given, so a group of requests leaves together) and fills `req` as the
    SSE `data:` lines arrive (times from time.perf_counter, s). A stream must end with a finish reason; with
    `usage_required` also with `[DONE]` and the usage chunk (this API always sends it), else a reply without
    usage that ended by length is counted as `max_tokens` tokens (llama.cpp's server sends none). Errors (a
    non-200 answer, an error event, a stream cut short) are kept in `req.error`, for the caller to report."""
    if start is not None:
        start.wait()
    req.sent, req.sent_wall = time.perf_counter(), time.time()
    try:
        with client.stream("POST", f"{base_url}/v1/chat/completions", json=payload) as resp:
            if resp.status_code != 200:
                resp.read()
                raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:500]}")
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, `: ping` comments
                data = line[5:].strip()
                if data == "[DONE]":
                    req.done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(f"error event: {chunk['error']}")
                if req.turn_id is None and str(chunk.get("id", "")).startswith("chatcmpl-"):
                    req.turn_id = chunk["id"].removeprefix("chatcmpl-")
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        req.first = req.first or time.perf_counter()
                        req.parts.append(text)
                    if choice.get("finish_reason"):
                        req.end, req.finish_reason = time.perf_counter(), choice["finish_reason"]
                if usage := chunk.get("usage"):
                    req.completion_tokens, req.prompt_tokens = usage["completion_tokens"], usage["prompt_tokens"]
                    req.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
                    req.usage_reported = True
        if req.end is None or (usage_required and not (req.done and req.usage_reported)):
            raise RuntimeError(f"stream ended early (done {req.done}, finish {req.finish_reason}, "
                               f"usage {req.completion_tokens})")
        if req.completion_tokens is None and req.finish_reason == "length":
            req.completion_tokens = payload["max_tokens"]
    except Exception as e:  # reported by the caller, with the others
        req.error = f"{type(e).__name__}: {e}"
    return req


def stream_one(
    client: Any, base_url: str, question: str, max_tokens: int, ignore_eos: bool,
    start: threading.Barrier | None = None,
) -> Req:
    """One streaming request of this section (see the module's doc), read by stream_chat."""
    return stream_chat(client, base_url, body(question, max_tokens, ignore_eos), Req(question), start)


def concurrent(client: Any, base_url: str, questions: list[str], max_tokens: int, ignore_eos: bool) -> list[Req]:
    """All questions at once, one thread each, released together by a barrier."""
    out: list[Req | None] = [None] * len(questions)
    barrier = threading.Barrier(len(questions))

    def go(i: int) -> None:
        out[i] = stream_one(client, base_url, questions[i], max_tokens, ignore_eos, barrier)

    threads = [threading.Thread(target=go, args=(i,), daemon=True) for i in range(len(questions))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return [r for r in out if r is not None]


# The stages of one request's TTFT, each from the same request (so this VM's drift between sections cancels):
# api = sent -> the API built the turn (enqueued_at); pickup = -> the worker claimed it (started_at, BEGIN);
# worker = -> its first text was in the stream (the entry id's Redis time), of which prefill = the engine's
# forward for this prompt (TurnResult.timings.prefill_s); out = -> the client read it. path = TTFT - prefill:
# what the serving path adds to the model's own work, arrival holds and batch mates' prefills included.
STAGES = ("api", "pickup", "worker", "prefill", "out", "path")


def stage_times(r: Any, reqs: list[Req]) -> None:
    """Fill each request's `stages` (ms) from its turn's record and stream (read after the timings)."""
    for q in reqs:
        if q.turn_id is None or q.first is None:
            continue
        rec = r.hmget(f"chat:turn:{q.turn_id}", ["enqueued_at", "started_at", "result"])
        if None in rec:
            continue
        texts = [eid for eid, f in r.xrange(f"chat:turn:{q.turn_id}:stream") if b"t" in f]
        if not texts:
            continue
        enq, started = float(rec[0]), float(rec[1])
        prefill = json.loads(rec[2])["timings"]["prefill_s"]
        flushed = int(texts[0].split(b"-")[0]) / 1e3
        first_wall = q.sent_wall + (q.first - q.sent)
        ms = {"api": enq - q.sent_wall, "pickup": started - enq, "worker": flushed - started, "prefill": prefill,
              "out": first_wall - flushed, "path": (q.first - q.sent) - prefill}
        q.stages = {k: round(v * 1e3, 1) for k, v in ms.items()}


def check(reqs: list[Req]) -> None:
    errors = [r.error for r in reqs if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(reqs)} request(s) failed: {errors[0]}")


def summarize(groups: list[list[Req]], max_tokens: int) -> dict[str, Any]:
    """Figures over groups of requests (a group = one request alone, or one round sent at once):
    tok/s total = all completion tokens / the sum of the groups' walls (first send -> last end)."""
    reqs = [r for g in groups for r in g]
    walls = [max(r.end for r in g if r.end) - min(r.sent for r in g) for g in groups]
    tokens = sum(r.completion_tokens or 0 for r in reqs)
    ttfts = [r.ttft for r in reqs if r.ttft is not None]
    per_stream = [(r.completion_tokens or 0) / (r.end - r.sent) for r in reqs if r.end and r.end > r.sent]
    toks = [r.completion_tokens or 0 for r in reqs]
    return {
        "requests": len(reqs),
        "groups": len(groups),
        "tokens": tokens,
        "tokens_max": max_tokens * len(reqs),
        "completion_tokens_min_max": [min(toks), max(toks)],
        "all_full_length": all(t == max_tokens for t in toks),
        "finish_reasons": sorted({r.finish_reason or "?" for r in reqs}),
        "no_content": sum(r.first is None for r in reqs),  # replies with no text at all (no TTFT)
        "prompt_tokens_mean": rnd(sum(r.prompt_tokens or 0 for r in reqs) / len(reqs), 1),
        "wall_s": round(sum(walls), 3),
        "group_walls_s": [round(w, 3) for w in walls],
        "group_tok_s_total": [
            rnd(sum(r.completion_tokens or 0 for r in g) / w, 1) for g, w in zip(groups, walls) if w > 0
        ],
        "tok_s_total": rnd(tokens / sum(walls), 1) if sum(walls) > 0 else None,
        "tok_s_per_stream_median": rnd(median(per_stream), 1) if per_stream else None,
        "ttft_ms_p50": rnd(pct(ttfts, 50) * 1e3 if ttfts else None, 1),
        "ttft_ms_p95": rnd(pct(ttfts, 95) * 1e3 if ttfts else None, 1),
        "stages_ms_p50": {k: rnd(median(v), 1) for k in STAGES if (v := [r.stages[k] for r in reqs if r.stages])},
        "path_ms_p95": rnd(pct(paths, 95), 1) if (paths := [r.stages["path"] for r in reqs if r.stages]) else None,
        "per_request": [r.row() for r in reqs],
    }


class ApiProcess:
    """`python -m producer.api --redis URL --port P` as deployed; its log in a file."""

    def __init__(self, redis_url: str, port: int, log_path: Path, **env: str):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "w")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
        full_env.pop("CHAT_API_KEYS_FILE", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "producer.api", "--redis", redis_url, "--port", str(port)],
            cwd=ROOT,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_healthy(self, timeout: float = 60) -> None:
        wait_http_ok(self.proc, f"{self.url}/healthz", timeout, "API", lambda: self.log()[-3000:], every_s=0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # graceful: no stream is open by now
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def run(*, new: int, singles: int, rounds: int, ignore_eos: bool = True) -> dict[str, Any]:
    import httpx
    import redis
    import torch

    from config.settings import Settings
    from tests.bench.stack import PrivateRedis
    from tests.procs import WorkerProcess

    clients = CLIENTS
    threads = torch.get_num_threads()  # what section 1's engine runs with in this process
    flush_ms = Settings.model_fields["stream_flush_ms"].default
    burst = 10 * (singles + clients * rounds + clients + 10)
    out: dict[str, Any] = {
        "model": MODEL,
        "device_preset": DEVICE,
        "slots": SLOTS,
        "threads": threads,
        "stream_flush_ms": flush_ms,
        "max_tokens": new,
        "temperature": 0.0,
        "clients": clients,
        "questions": QUESTIONS,
        "rate_limit_burst": burst,
    }
    log_dir = Path(tempfile.mkdtemp(prefix="bench-http-"))
    priv: PrivateRedis | None = None
    rc: redis.Redis | None = None
    worker: WorkerProcess | None = None
    api: ApiProcess | None = None
    client: httpx.Client | None = None
    ok = False
    try:
        priv = PrivateRedis()
        r = redis.Redis.from_url(priv.url)
        out["redis_url"] = priv.url
        out["redis_version"] = r.info("server")["redis_version"]
        rc = r  # read after each group, outside the timings (stage_times)
        log(f"http: starting a worker ({MODEL}, {DEVICE}, {SLOTS} slots, {threads} threads) on {priv.url}")
        t0 = time.perf_counter()
        worker = WorkerProcess(
            priv.url,
            "bench-http",
            log_dir,
            CHAT_MODEL=MODEL,
            CHAT_DEVICE=DEVICE,
            CHAT_SLOTS=str(SLOTS),
            CHAT_THREADS=str(threads),
            CHAT_STREAM_FLUSH_MS=str(flush_ms),
            # The requests below repeat section 1's prompts, which the prefix cache would serve from memory:
            # off, so that both sides prefill every prompt and the difference is the serving path alone.
            CHAT_PREFIX_CACHE="false",
            TQDM_DISABLE="1",
        )
        port = free_port()
        # Auth off; the rate limiter stays in the path (as deployed) with a bucket the run cannot empty.
        api = ApiProcess(priv.url, port, log_dir / "api.log", CHAT_API_KEYS="", CHAT_RATE_LIMIT_BURST=str(burst))
        api.wait_healthy(timeout=60)
        out["api_ready_s"] = round(time.perf_counter() - t0, 1)
        worker.wait_ready(timeout=600)
        out["worker_ready_s"] = round(time.perf_counter() - t0, 1)
        log(f"http: worker ready in {out['worker_ready_s']} s, API on {api.url}")

        limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
        client = httpx.Client(timeout=httpx.Timeout(600, connect=10), limits=limits)
        # Warm-up, outside the timings: one request alone, one round of `clients` at once (every batch
        # width the runs below use; it also opens the keep-alive connections the clients then reuse).
        warm = [stream_one(client, api.url, QUESTIONS[0], 4, ignore_eos)]
        warm += concurrent(client, api.url, [QUESTIONS[i % len(QUESTIONS)] for i in range(clients)], 4, ignore_eos)
        check(warm)
        out["warm_up_requests"] = len(warm)

        def measured(g: list[Req]) -> list[Req]:  # each group checked, then its stages read (outside timings)
            check(g)
            stage_times(rc, g)
            return g

        log(f"http: 1 client, {singles} requests one after another ({new} max tokens)")
        groups = [measured([stream_one(client, api.url, QUESTIONS[i % len(QUESTIONS)], new, ignore_eos)])
                  for i in range(singles)]
        out["1_client"] = summarize(groups, new)
        s = out["1_client"]
        log(f"http: 1 client: TTFT p50 {s['ttft_ms_p50']} ms, {s['tok_s_total']} tok/s")

        log(f"http: {clients} clients at once, {rounds} round(s)")
        burst = [QUESTIONS[i % len(QUESTIONS)] for i in range(clients)]
        groups = [measured(concurrent(client, api.url, burst, new, ignore_eos)) for _ in range(rounds)]
        out["8_clients"] = summarize(groups, new)
        s = out["8_clients"]
        log(f"http: {clients} clients: TTFT p50 {s['ttft_ms_p50']} ms, {s['tok_s_total']} tok/s total")
        ok = True
    except Exception:
        for name, proc in (("worker", worker), ("API", api)):
            if proc is not None:
                log(f"http: {name} log ({proc.log_path}):\n{proc.log()[-3000:]}")
        raise
    finally:
        # Every process started above, even when something failed (each stop on its own).
        stops: list[tuple[str, Any]] = [("HTTP client", client and client.close), ("API", api and api.stop)]
        stops.append(("Redis client", rc and rc.close))
        stops += [("worker", worker and worker.stop), ("redis-server", priv and priv.close)]
        for name, stop in stops:
            if stop is None:
                continue
            try:
                stop()
            except Exception as e:  # keep stopping the others
                log(f"http: stopping the {name}: {e!r}")
        if ok:
            shutil.rmtree(log_dir, ignore_errors=True)
        else:
            log(f"http: logs kept in {log_dir}")
    return out


def vs_engine(h: dict[str, Any], cpu: dict[str, Any] | None) -> dict[str, Any]:
    """The HTTP figures beside the engine alone (section 1, preset `cpu`) of the same run, with the targets."""
    eng = ((cpu or {}).get("presets") or {}).get(DEVICE)
    if cpu is None:
        return {"available": False, "why": "section cpu not run in this invocation"}
    if "error" in cpu or not eng:
        return {"available": False, "why": f"section cpu failed: {cpu.get('error', f'no preset {DEVICE}')}"}
    out: dict[str, Any] = {
        "available": True,
        "engine_preset": DEVICE,
        "engine_new_tokens": cpu.get("new_tokens"),
        "engine_ignore_eos": cpu.get("ignore_eos"),
        "same_length_setting": cpu.get("new_tokens") == h.get("max_tokens"),
        "engine_prompt_tokens": (cpu.get("prompt_tokens") or {}).get("ours"),
    }
    for key, scen in ENGINE_SCENARIO.items():
        hs, es = h.get(key), eng.get(scen)
        if not hs or not es:
            continue
        e: dict[str, Any] = {
            "engine_scenario": scen,
            "engine_ttft_ms_p50": es["ttft_ms_p50"],
            "engine_ttft_ms_p95": es["ttft_ms_p95"],
            "engine_tok_s_total": es["tok_s_total"],
            "engine_tok_s_per_stream": es["tok_s_per_stream_median"],
            "http_ttft_ms_p50": hs["ttft_ms_p50"],
            "http_tok_s_total": hs["tok_s_total"],
            "ttft_diff_ms": None,
            "tok_s_ratio": None,
            "target_ttft_diff_ms": TTFT_TARGET_MS[key],
        }
        if hs["ttft_ms_p50"] is not None and es["ttft_ms_p50"] is not None:
            e["ttft_diff_ms"] = rnd(hs["ttft_ms_p50"] - es["ttft_ms_p50"], 1)
            e["meets_ttft_target"] = e["ttft_diff_ms"] <= TTFT_TARGET_MS[key]
        if hs["tok_s_total"] and es["tok_s_total"]:
            e["tok_s_ratio"] = rnd(hs["tok_s_total"] / es["tok_s_total"], 3)
            if key == "8_clients":
                e["target_tok_s_ratio"] = TOK_S_TARGET_RATIO
                e["meets_tok_s_target"] = e["tok_s_ratio"] >= TOK_S_TARGET_RATIO
        out[key] = e
    return out
