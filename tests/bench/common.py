"""Shared pieces: machine info, percentiles, baseline subprocesses, and driving the engine."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# The baselines live beside the repository (shared, read-only) and are always run from there.
# The reference scripts; CHAT_BENCH_BASELINES points elsewhere (a copy carried to a GPU machine).
BASELINE_DIR = Path(os.environ.get("CHAT_BENCH_BASELINES") or ROOT / ".." / "shared" / "bench").resolve()


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float | None:
    """Percentile with linear interpolation (numpy's default); None for no values."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def rnd(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


# -- machine -------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """HEAD's commit read from .git's files (the bench does not run git)."""
    git = ROOT / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if (git / ref).exists():
            return (git / ref).read_text().strip()
        packed = git / "packed-refs"
        if packed.exists():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split(" ", 1)[0]
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    import torch
    import transformers

    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
        mem_gb = round(psutil.virtual_memory().total / 1e9, 1)
    except ImportError:
        physical, mem_gb = None, None
    info: dict[str, Any] = {
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "git_commit": git_commit(),
        "host": platform.node(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical,
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": mem_gb,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    return info


# -- baselines -------------------------------------------------------------------------------------------
def run_baseline(script: str, timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ../shared/bench/<script> with this interpreter; returns its JSON lines and how it went."""
    path = BASELINE_DIR / script
    out: dict[str, Any] = {"script": str(path), "ran": False, "lines": [], "env": env or {}}
    if not path.exists():
        out["error"] = f"{path} not found"
        return out
    t0 = time.perf_counter()
    log(f"baseline: {path} {' '.join(f'{k}={v}' for k, v in (env or {}).items())}")
    try:
        p = subprocess.run(
            [sys.executable, str(path)],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        out["error"] = f"timed out after {timeout:.0f}s"
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        out["lines"] = _json_lines(stdout)
        return out
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    out["returncode"] = p.returncode
    out["lines"] = _json_lines(p.stdout)
    out["ran"] = p.returncode == 0
    if p.returncode != 0:
        out["error"] = f"exit {p.returncode}: " + (p.stderr or "")[-2000:]
    return out


def _json_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                pass
    return lines


# -- driving the engine --------------------------------------------------------------------------------
class TimedBackend:
    """Passes through to a backend and logs when each prefill and decode call starts (and how many
    rows a decode has active), so the steady decode step time can be read off afterwards."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.slots = inner.slots
        self.max_len = inner.max_len
        self.events: list[tuple[str, float, int]] = []

    @property
    def attached(self) -> bool:
        return self.inner.attached

    def prefill(self, prefills: Any) -> Any:
        self.events.append(("p", time.perf_counter(), sum(len(p.ids) for p in prefills)))
        return self.inner.prefill(prefills)

    def decode(self, ids: Any, positions: Any, active: Any) -> Any:
        self.events.append(("d", time.perf_counter(), int(active.sum())))
        return self.inner.decode(ids, positions, active)

    def detach(self) -> None:
        self.inner.detach()

    def step_ms(self) -> dict[int, float]:
        """Median time from one decode call to the next, by active rows, over runs of decode calls
        with no prefill between (the engine's whole step: forward, sampling, bookkeeping)."""
        gaps: dict[int, list[float]] = defaultdict(list)
        ev = self.events
        for a, b in zip(ev, ev[1:]):
            if a[0] == "d" and b[0] == "d" and a[2] == b[2]:
                gaps[a[2]].append(b[1] - a[1])
        return {n: round(median(g) * 1e3, 2) for n, g in sorted(gaps.items())}


@dataclass
class StreamStat:
    submit: float
    first: float | None = None  # first event (text or the end) read by the consumer
    done: float | None = None
    tokens: int = 0
    prompt_tokens: int = 0
    reason: str = ""
    prefill_s: float = 0.0
    decode_s: float = 0.0
    error: str | None = None
    text: str = field(default="", repr=False)

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.submit


def run_streams(
    engine: Any, prompts: list[list[int]], max_new: int, params: Any, offsets: list[float] | None = None
) -> tuple[list[StreamStat], float]:
    """Submit each prompt at its offset (seconds from the start; None = all at once), read every
    stream in its own thread (as the worker's task threads do), wait for all. Returns the streams
    and the wall time from the first submit to the last end."""
    from worker.engine.engine import Failed, Finished

    offsets = offsets or [0.0] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: offsets[i])
    stats: list[StreamStat | None] = [None] * len(prompts)
    threads = []

    def consume(handle: Any, st: StreamStat) -> None:
        for ev in handle:
            now = time.perf_counter()
            if st.first is None:
                st.first = now
            if isinstance(ev, Finished):
                st.done = now
                st.tokens, st.prompt_tokens, st.reason = ev.completion_tokens, ev.prompt_tokens, ev.reason.value
                st.prefill_s, st.decode_s, st.text = ev.prefill_s, ev.decode_s, ev.text
            elif isinstance(ev, Failed):
                st.done, st.error = now, ev.error

    t0 = time.perf_counter()
    for i in order:
        wait = t0 + offsets[i] - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        st = StreamStat(submit=time.perf_counter())
        stats[i] = st
        h = engine.submit(prompts[i], params, max_new)
        th = threading.Thread(target=consume, args=(h, st), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    done = [s for s in stats if s is not None]
    errors = [s.error for s in done if s.error]
    if errors:
        raise RuntimeError(f"{len(errors)} stream(s) failed: {errors[0]}")
    wall = max(s.done for s in done if s.done) - min(s.submit for s in done)
    return done, wall


def summarize(stats: list[StreamStat], wall: float, expected: int, steps: dict[int, float]) -> dict[str, Any]:
    tokens = sum(s.tokens for s in stats)
    ttfts = [s.ttft for s in stats if s.ttft is not None]
    per_stream = [s.tokens / (s.done - s.submit) for s in stats if s.done and s.done > s.submit]
    n = len(stats)
    return {
        "streams": n,
        "tokens": tokens,
        "tokens_expected": expected * n,
        "all_full_length": all(s.tokens == expected for s in stats),
        "finish_reasons": sorted({s.reason for s in stats}),
        "prompt_tokens_mean": rnd(sum(s.prompt_tokens for s in stats) / n, 1),
        "wall_s": round(wall, 3),
        "tok_s_total": rnd(tokens / wall, 1),
        "tok_s_per_stream_median": rnd(median(per_stream), 1) if per_stream else None,
        "ttft_ms_p50": rnd(pct(ttfts, 50) * 1e3 if ttfts else None, 1),
        "ttft_ms_p95": rnd(pct(ttfts, 95) * 1e3 if ttfts else None, 1),
        "prefill_ms_median": rnd(median(s.prefill_s for s in stats) * 1e3, 1),
        "step_ms_by_active": {str(k): v for k, v in steps.items()},
        "step_ms_all_active": steps.get(n),
    }


def measure(engine: Any, backend: TimedBackend, prompts, max_new, params, offsets=None) -> dict[str, Any]:
    backend.events.clear()
    stats, wall = run_streams(engine, prompts, max_new, params, offsets)
    out = summarize(stats, wall, max_new, backend.step_ms())
    if offsets is not None:
        out["arrival_offsets_s"] = [round(o, 3) for o in offsets]
    return out


def wait_http_ok(proc: subprocess.Popen, url: str, timeout: float, what: str, tail: Callable[[], str],
                 every_s: float = 0.2) -> None:
    """Poll GET `url` until it answers 200. Raises RuntimeError when `proc` exits first, TimeoutError after
    `timeout` s; both end with `tail()` (the process's log)."""
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: ...{tail()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(every_s)
    raise TimeoutError(f"{what} not ready in {timeout} s: ...{tail()}")
