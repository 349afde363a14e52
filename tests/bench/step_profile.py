"""Where a CPU decode step goes: `python -m tests.bench.step_profile [--preset cpu] [--rows 1,8] [--steps 40]`.

The backend's decode step alone (TorchBackend.decode on the preset's model, no engine, no sampling), as the
CPU-decode issue asks it measured before and after a change: per row count, the median ms per step over `--steps`
steps after a warm-up (KV positions advancing from a 40-token prompt in every row), and from one profiled step
(torch.profiler, CPU) the number of ATen operations (and calls of the project's kernels), the time in the weight
matmuls and the top operators by self CPU time. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from statistics import median
from typing import Any

import torch


@contextmanager
def labelled_cpu_gemm() -> Iterator[None]:
    """The project's kernels are ctypes calls, invisible to torch.profiler: label each call while profiling
    (cpu_gemm::chat_q4_gemm / chat_q8_gemm, cpu_attention::decode, cpu_decode_layer::decode_layers: a decode step's
    layers, one kernel call each)."""
    from worker.pipeline import cpu_attention, cpu_gemm, lean_llama

    real_mm, real_attention, real_layers = cpu_gemm._run, cpu_attention._run, lean_llama.decode_layers

    def mm(bits: int, *args: Any) -> torch.Tensor:
        with torch.profiler.record_function(f"cpu_gemm::chat_q{bits}_gemm"):
            return real_mm(bits, *args)

    def attention(*args: Any) -> torch.Tensor:
        with torch.profiler.record_function("cpu_attention::decode"):
            return real_attention(*args)

    def layers(*args: Any) -> torch.Tensor:
        with torch.profiler.record_function("cpu_decode_layer::decode_layers"):
            return real_layers(*args)

    cpu_gemm._run, cpu_attention._run, lean_llama.decode_layers = mm, attention, layers
    try:
        yield
    finally:
        cpu_gemm._run, cpu_attention._run, lean_llama.decode_layers = real_mm, real_attention, real_layers


def profile_rows(backend: Any, rows: int, steps: int, prompt_len: int = 40) -> dict[str, Any]:
    from worker.pipeline.backend import Prefill

    backend.prefill([Prefill(r, list(range(100, 100 + prompt_len)), 0) for r in range(rows)])
    ids = torch.full((rows,), 200)
    active = torch.ones(rows, dtype=torch.bool)
    pos = prompt_len

    def step() -> None:
        nonlocal pos
        backend.decode(ids, torch.full((rows,), pos), active)
        pos += 1

    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, labelled_cpu_gemm():
        step()
    events = [e for e in prof.events() if e.name.startswith(("aten::", "cpu_gemm::", "cpu_attention::",
                                                             "cpu_decode_layer::"))]
    by_self = Counter()
    for e in events:
        by_self[e.name] += e.self_cpu_time_total
    mm = sum(t for name, t in by_self.items()
             if "mm" in name or "linear" in name or "int8pack" in name or name.startswith("cpu_gemm::"))
    return {"rows": rows, "step_ms_p50": round(median(times) * 1e3, 2), "aten_ops": len(events),
            "matmul_self_ms": round(mm / 1e3, 2), "self_ms_total": round(sum(by_self.values()) / 1e3, 2),
            "top_self_ms": {k: round(v / 1e3, 2) for k, v in by_self.most_common(8)}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.step_profile", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--cpu-gemm", choices=["auto", "torch"], help="override the preset's cpu_gemm")
    a = ap.parse_args(argv)
    from config.presets import load_presets
    from worker.pipeline.factory import backend_dtype, build_backend
    from worker.pipeline.loader import load_model

    presets = load_presets()
    mp, dev = presets.model("smollm2-135m"), presets.device(a.preset)
    if a.cpu_gemm:
        dev = dev.model_copy(update={"cpu_gemm": a.cpu_gemm})

    # Loaded, built and measured on this one thread, as the worker's engine thread does (own_thread.py says why).
    loaded = load_model(mp, backend_dtype(dev))
    backend = build_backend(dev, loaded, mp.sequence_length)
    backend.warm_up()
    rows = [profile_rows(backend, int(r), a.steps) for r in a.rows.split(",")]
    print(json.dumps({"preset": a.preset, "cpu_gemm": dev.cpu_gemm, "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
