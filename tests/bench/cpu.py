"""Section 1: the engine on CPU (SmolLM2-135M, presets `cpu` = int8 and `cpu-fp32`) beside
../shared/bench/cpu_baseline.py (plain transformers generate, fp32) run in the same invocation."""

from __future__ import annotations

import ast
import copy
import dataclasses
import gc
import random
import time
from typing import Any

from tests.bench.common import BASELINE_DIR, TimedBackend, log, measure, rnd, run_baseline, run_streams

MODEL = "smollm2-135m"
PRESETS = ("cpu", "cpu-fp32")
# The baseline's eight questions and length, read from cpu_baseline.py itself (`qs`, `NEW`) so the two
# cannot drift apart; this copy is used only where that file is absent.
_FALLBACK_QUESTIONS = [
    "How many islands are there in Scotland?",
    "What animals are similar to alpacas?",
    "Are you related to Dolly?",
    "Explain what a message queue is.",
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "What is 17 times 23?",
]


def _baseline_constants() -> dict[str, Any]:
    try:
        tree = ast.parse((BASELINE_DIR / "cpu_baseline.py").read_text())
    except (OSError, SyntaxError):
        return {}
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("qs", "NEW"):
                try:
                    out[node.targets[0].id] = ast.literal_eval(node.value)
                except ValueError:
                    pass
    return out


_BASE = _baseline_constants()
QUESTIONS: list[str] = _BASE.get("qs") or _FALLBACK_QUESTIONS
BASELINE_NEW: int = _BASE.get("NEW") or 128
QUESTIONS_FROM_BASELINE = "qs" in _BASE
TARGETS = {"1_stream": 1.3, "8_together": 1.7}


def bench_codec(codec: Any, ignore_eos: bool) -> Any:
    """The model's codec, or a copy of it with no end ids: the engine then generates exactly max_new
    tokens, as the baseline's min_new_tokens does (an end token is generated and passed over)."""
    if not ignore_eos:
        return codec
    c = copy.copy(codec)
    c.end_ids = set()
    return c


def prompts_for(codec: Any, seq_len: int, new: int, questions: list[str] | None = None) -> list[list[int]]:
    """Each question (default QUESTIONS) as a one-message chat prompt with room for `new` tokens."""
    from shared.context import fit
    from shared.messages import ChatMessage, Role

    out = []
    for q in QUESTIONS if questions is None else questions:
        fp = fit(codec, [ChatMessage(role=Role.prompter, text=q)], seq_len, new)
        if fp.max_new < new or fp.dropped_messages or fp.truncated_tokens:
            raise RuntimeError(f"prompt {q!r} does not fit {new} new tokens in {seq_len}")
        out.append(fp.ids)
    return out


def baseline_prompt_tokens(tokenizer: Any) -> list[int]:
    """Prompt lengths as cpu_baseline.py tokenizes them (whole rendered template, one call)."""
    out = []
    for q in QUESTIONS:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        out.append(len(tokenizer(text)["input_ids"]))
    return out


def parse_baseline(res: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: v for k, v in res.items() if k != "lines"}
    out["raw"] = res.get("lines", [])
    for line in res.get("lines", []):
        if "threads" in line:
            out["threads"], out["load_s"] = line.get("threads"), line.get("load_s")
        if line.get("label") == "hf_generate_cpu_smollm2":
            out[f"batch{line['batch']}"] = line
    return out


def run(
    *, quick: bool, new: int, baseline: bool, ignore_eos: bool, window_s: float, seed: int, repeat: int
) -> dict[str, Any]:
    import torch

    from config.presets import load_presets
    from shared.sampling import SamplingParams
    from worker.engine.engine import Engine
    from worker.engine.own_thread import start_on_own_thread
    from worker.pipeline.factory import backend_dtype, build_backend
    from worker.pipeline.loader import load_model

    out: dict[str, Any] = {
        "model": MODEL,
        "new_tokens": new,
        "ignore_eos": ignore_eos,
        "arrival_window_s": window_s,
        "seed": seed,
        "torch_threads": torch.get_num_threads(),
        "questions": QUESTIONS,
        "questions_read_from_baseline": QUESTIONS_FROM_BASELINE,
    }
    # The baseline first (its own process, nothing else running), then ours.
    if baseline:
        out["baseline"] = parse_baseline(run_baseline("cpu_baseline.py", timeout=3600))
        if not out["baseline"].get("ran"):
            log(f"cpu baseline failed: {out['baseline'].get('error')}")
    else:
        out["baseline"] = {
            "ran": False,
            "skipped": "--quick; add --baseline to run it" if quick else "--no-baseline",
        }

    presets = load_presets()
    mp = presets.model(MODEL)
    seq_len = mp.sequence_length
    params = SamplingParams(temperature=0.0)
    loaded_by_dtype: dict[Any, Any] = {}
    out["presets"] = {}
    for name in PRESETS:
        dev = presets.device(name)
        dtype = backend_dtype(dev)
        t0 = time.perf_counter()
        load_s = [0.0]

        def setup(dev: Any = dev, dtype: Any = dtype, load_s: list[float] = load_s) -> Any:
            """As the worker does it: load, build and warm up on the engine's own thread (own_thread.py)."""
            if dtype not in loaded_by_dtype:
                t1 = time.perf_counter()
                loaded_by_dtype[dtype] = load_model(mp, dtype)
                load_s[0] = time.perf_counter() - t1  # not part of the warm-up figure
                log(f"loaded {MODEL} ({dtype}) in {load_s[0]:.1f}s")
            loaded = loaded_by_dtype[dtype]
            # quantize=int8 converts the model in place: give it a copy.
            mine = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model)) if dev.quantize != "none" else loaded
            inner = build_backend(dev, mine, seq_len)
            inner.warm_up()
            backend = TimedBackend(inner)
            engine = Engine(backend, bench_codec(loaded.codec, ignore_eos), device=dev.device)
            return engine, (loaded, inner, backend)

        engine, (loaded, inner, backend) = start_on_own_thread(setup)
        prompts = prompts_for(loaded.codec, seq_len, new)
        # Warm-up outside the timings: every batch width the runs below use, a few tokens each.
        run_streams(engine, prompts, 4, params)
        run_streams(engine, prompts[:1], 4, params)
        warm_s = time.perf_counter() - t0 - load_s[0]
        log(f"{name}: backend built and warmed up in {warm_s:.1f}s; measuring")
        res: dict[str, Any] = {
            "device_preset": dev.model_dump(),
            "slots": dev.slots,
            "sequence_length": seq_len,
            "warm_up_s": round(warm_s, 1),
        }
        singles = [measure(engine, backend, prompts[:1], new, params) for _ in range(max(1, repeat))]
        singles.sort(key=lambda r: r["tok_s_total"])
        res["1_stream"] = singles[len(singles) // 2]  # the median run
        if repeat > 1:
            res["1_stream"]["repeats_tok_s"] = [r["tok_s_total"] for r in singles]
        log(f"{name}: 1 stream {res['1_stream']['tok_s_total']} tok/s")
        res["8_together"] = measure(engine, backend, prompts, new, params)
        log(f"{name}: 8 together {res['8_together']['tok_s_total']} tok/s")
        rng = random.Random(seed)
        offsets = sorted(rng.uniform(0, window_s) for _ in prompts)
        res["8_random"] = measure(engine, backend, prompts, new, params, offsets)
        log(f"{name}: 8 random arrivals {res['8_random']['tok_s_total']} tok/s")
        engine.stop()
        inner.detach()
        out["presets"][name] = res
        del engine, backend, inner
        gc.collect()

    any_loaded = next(iter(loaded_by_dtype.values()))
    ours_len = [len(p) for p in prompts_for(any_loaded.codec, seq_len, new)]
    theirs_len = baseline_prompt_tokens(any_loaded.tokenizer)
    out["prompt_tokens"] = {"ours": ours_len, "baseline_tokenization": theirs_len}
    out["ratios"] = ratios(out)
    return out


def ratios(out: dict[str, Any]) -> dict[str, Any]:
    """Ours / baseline, tok/s total; like-for-like only when both generated the baseline's length."""
    b = out.get("baseline", {})
    ref = {"1_stream": b.get("batch1"), "8_together": b.get("batch8"), "8_random": b.get("batch8")}
    res: dict[str, Any] = {}
    for name, r in out.get("presets", {}).items():
        res[name] = {}
        for scen, base in ref.items():
            if not base or scen not in r:
                continue
            ratio = r[scen]["tok_s_total"] / base["tok_s_total"]
            entry = {
                "ours_tok_s": r[scen]["tok_s_total"],
                "baseline_tok_s": base["tok_s_total"],
                "ratio": rnd(ratio, 2),
                # 8_random is a different workload (arrivals spread out) than the baseline's static batch.
                "comparable": scen != "8_random"
                and out["new_tokens"] == base.get("new")
                and r[scen]["all_full_length"],
            }
            if scen in TARGETS:
                entry["target"] = TARGETS[scen]
                entry["meets_target"] = ratio >= TARGETS[scen]
            res[name][scen] = entry
    return res
