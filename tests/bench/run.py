"""`make bench`: python -m tests.bench.run [--quick] [--only cpu|http|queue|gpu] [--out docs/BENCHMARKS.md]
[--json docs/benchmarks.json]

1. cpu   — the engine on CPU (SmolLM2-135M; presets cpu = int8 and cpu-fp32): 1 stream, 8 together,
           8 at random arrivals, beside ../shared/bench/cpu_baseline.py run as a subprocess.
2. queue — the whole stack on Redis ($REDIS_URL, default redis://127.0.0.1:6379/13, FLUSHED): queue
           overhead over sequential turns, Redis commands per generated token at 64 concurrent streams.
3. gpu   — only with CUDA: the engine on a Pythia-12B-shaped model at 1/8/32/64 streams beside
           ../shared/bench/gpu_baseline.py. Without a GPU the report says it was not measured (and a
           tiny CPU smoke run checks the code path).
4. http  — the HTTP serving path: a private redis-server, a worker (`python -m worker`, SmolLM2-135M,
           preset cpu, 8 slots) and the API (`python -m producer.api`); streaming /v1/chat/completions
           from 1 client (one request after another) and 8 clients at once: TTFT p50/p95, tok/s per
           stream and in total, beside section 1's engine-alone figures (preset cpu) with targets. Run
           right after cpu (before queue and gpu), so that the two are measured close together.
5. multiturn — issue 14's multi-turn workload (16 conversations x 12 turns, stateless /v1 resending
           the history) through Redis, workers and the API: 1 worker with the prefix cache off and on,
           3 workers with shared-queue and cache-aware routing; TTFT per turn index, tokens reused.
           Not in the default set (about half an hour on 2 cores): ask for it with --only.

Prints the Markdown report, writes it to --out and the same figures to --json. Run it on a quiet
machine: everything is wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from tests.bench import report
from tests.bench.common import ROOT, log, machine_info

SECTIONS = ("cpu", "http", "queue", "gpu", "multiturn")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.run", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke-test sizes: few tokens and turns, CPU baseline skipped (it has no small mode)",
    )
    ap.add_argument("--only", help="comma-separated sections: cpu, http, queue, gpu, multiturn "
                    "(default: all but multiturn)")
    ap.add_argument("--out", default="docs/BENCHMARKS.md", help="Markdown report ('' = do not write)")
    ap.add_argument("--json", default="docs/benchmarks.json", help="JSON results ('' = do not write)")
    b = ap.add_mutually_exclusive_group()
    b.add_argument(
        "--baseline", dest="baseline", action="store_true", default=None, help="run the baselines even with --quick"
    )
    b.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the baselines")
    ap.add_argument("--note", help="a line of context for the report (e.g. 'busy shared machine')")
    g = ap.add_argument_group("cpu")
    g.add_argument(
        "--new-tokens", type=int, help="new tokens per stream, also http's max_tokens (default 128; --quick 24)"
    )
    g.add_argument(
        "--respect-eos",
        action="store_true",
        help="let end keys stop generation (default: ignore them, to generate exactly --new-tokens)",
    )
    g.add_argument("--window", type=float, help="random arrivals spread over this many seconds (default 5; quick 2)")
    g.add_argument("--seed", type=int, default=1234, help="arrival offsets seed")
    g.add_argument("--repeat", type=int, default=1, help="1-stream runs per preset (the median is reported)")
    g = ap.add_argument_group("http")
    g.add_argument("--http-requests", type=int, help="1 client: requests one after another (default 5; quick 3)")
    g.add_argument("--http-rounds", type=int, help="8 clients: rounds of 8 requests at once (default 3; quick 2)")
    g = ap.add_argument_group("multiturn")
    g.add_argument("--mt-conversations", type=int, help="conversations (default 16; quick 4)")
    g.add_argument("--mt-turns", type=int, help="turns per conversation (default 12; quick 3)")
    g = ap.add_argument_group("queue")
    g.add_argument("--redis-url", help="default $REDIS_URL or redis://127.0.0.1:6379/13 (the db is flushed)")
    g.add_argument(
        "--private-redis",
        action="store_true",
        help="start a throw-away redis-server for this section (server counters then are all ours)",
    )
    g.add_argument("--queue-model", default="tiny-neox", help="model preset the worker serves (default tiny-neox)")
    g.add_argument("--turns", type=int, help="sequential turns for the queue overhead (default 200; quick 30)")
    g.add_argument(
        "--flush-ms",
        help="comma-separated CHAT_STREAM_FLUSH_MS values, one worker each (default: the settings default, 50, and 10)",
    )
    g.add_argument(
        "--turn-tokens",
        type=int,
        default=128,
        help="max_tokens of the sequential turns (default 128: long enough that the first text comes "
        "from the stream flusher, not with the final commit)",
    )
    g.add_argument("--streams", type=int, default=64, help="concurrent streams for commands per token (default 64)")
    g.add_argument("--stream-tokens", type=int, help="tokens per concurrent stream (default 128; quick 32)")
    g = ap.add_argument_group("gpu")
    g.add_argument("--gpu-max-len", type=int, default=512, help="KV positions per slot (default 512)")
    g.add_argument(
        "--gpu-compile",
        dest="gpu_compile",
        action="store_true",
        default=None,
        help="let gpu_baseline.py run its static-cache auto-compile row (default: on, off with --quick)",
    )
    g.add_argument("--no-gpu-compile", dest="gpu_compile", action="store_false")
    g.add_argument("--no-gpu-smoke", action="store_true", help="without a GPU, skip the tiny CPU smoke run")
    g.add_argument(
        "--gpu-partial",
        type=Path,
        help="also write the GPU section's results so far to this JSON after each part (a run cut short keeps them)",
    )
    g.add_argument(
        "--gpu-variants",
        default="graphs,compiled",
        help="engine variants to measure: graphs (CUDA graphs), compiled (torch.compile + CUDA graphs); default both",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    only = [s.strip() for s in a.only.split(",")] if a.only else [s for s in SECTIONS if s != "multiturn"]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        print(f"--only: unknown section(s) {bad}; expected {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    from tests.bench.gpu import VARIANTS

    bad = [v for v in a.gpu_variants.split(",") if v.strip() not in VARIANTS]
    if bad:
        print(f"--gpu-variants: unknown {bad}; expected {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader's progress bars
    q = a.quick
    baseline = a.baseline if a.baseline is not None else not q
    t_start = time.perf_counter()
    res: dict[str, Any] = {
        "schema": 1,
        "quick": q,
        "argv": sys.argv[1:] if argv is None else argv,
        "machine": machine_info(),
        "sections": {},
    }
    failed = []

    def section(name: str, fn: Any) -> None:
        log(f"== {name} ==")
        try:
            res["sections"][name] = fn()
        except Exception as e:  # a section that fails is reported, the others still run
            traceback.print_exc()
            res["sections"][name] = {"error": f"{type(e).__name__}: {e}"}
            failed.append(name)

    if "cpu" in only:
        from tests.bench import cpu

        new = a.new_tokens or (24 if q else cpu.BASELINE_NEW)
        section(
            "cpu",
            lambda: cpu.run(
                quick=q,
                new=new,
                baseline=baseline,
                ignore_eos=not a.respect_eos,
                window_s=a.window if a.window is not None else (2.0 if q else 5.0),
                seed=a.seed,
                repeat=a.repeat,
            ),
        )
    if "http" in only:
        from tests.bench import http
        from tests.bench.cpu import BASELINE_NEW

        section(
            "http",
            lambda: http.run(
                new=a.new_tokens or (24 if q else BASELINE_NEW),
                singles=a.http_requests or (3 if q else 5),
                rounds=a.http_rounds or (2 if q else 3),
                ignore_eos=not a.respect_eos,
            ),
        )
        if "error" not in res["sections"]["http"]:
            # Beside the engine alone of this run (section cpu, when it ran), with the targets.
            res["sections"]["http"]["vs_engine"] = http.vs_engine(res["sections"]["http"], res["sections"].get("cpu"))
    if "multiturn" in only:
        from tests.bench import multiturn

        section("multiturn", lambda: multiturn.run(conversations=a.mt_conversations or (4 if q else 16),
                                                   turns=a.mt_turns or (3 if q else 12)))
    if "queue" in only:
        from config.settings import Settings
        from tests.bench import stack

        default_flush = Settings.model_fields["stream_flush_ms"].default
        flush = [int(x) for x in a.flush_ms.split(",")] if a.flush_ms else [default_flush, 10]
        section(
            "stack",
            lambda: stack.run(
                quick=q,
                url=a.redis_url,
                private_redis=a.private_redis,
                model=a.queue_model,
                turns=a.turns or (30 if q else 200),
                flush_list=flush,
                concurrent=a.streams,
                conc_tokens=a.stream_tokens or (32 if q else 128),
                lat_tokens=a.turn_tokens,
            ),
        )
    if "gpu" in only:
        from tests.bench import gpu

        section(
            "gpu",
            lambda: gpu.run(
                smoke=not a.no_gpu_smoke,
                baseline=a.baseline if a.baseline is not None else True,
                compile_baseline=a.gpu_compile if a.gpu_compile is not None else not q,
                max_len=a.gpu_max_len,
                variants=[v.strip() for v in a.gpu_variants.split(",")],
                partial=(lambda sec: report.write({**res, "sections": {"gpu": sec}}, None, a.gpu_partial))
                if a.gpu_partial
                else None,
            ),
        )

    for name in res["sections"]:
        res["sections"][name]["_machine"] = res["machine"]  # travels with the section into a merge (report.py)
    res["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    notes = [a.note] if a.note else []
    load = res["machine"].get("loadavg_start")
    cpus = res["machine"]["usable_cpus"] or 1
    if load and load[0] > 0.5 * cpus:
        notes.append(
            f"The machine was busy: load average {load[0]} on {cpus} CPUs when this run started; "
            "wall-clock timings are unreliable."
        )
    res["note"] = " ".join(notes) or None
    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    if a.json and (ROOT / a.json).exists() and not a.quick:  # sections not run now stay as last measured
        res = report.carry_over(json.loads((ROOT / a.json).read_text()), res)
    md = report.write(res, ROOT / a.out if a.out else None, ROOT / a.json if a.json else None)
    print(md)
    if a.out or a.json:
        log(f"wrote {', '.join(p for p in (a.out, a.json) if p)} in {res['wall_s']} s")
    if failed:
        log(f"FAILED sections: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
