"""How far quantized replies stray from fp32: `python -m tests.bench.quant_agreement [--new 64] [--presets ...]`.

The CPU-decode issue asks the int8 (now also int4) replies checked against fp32 on a fixed set, the rate reported,
not asserted: SmolLM2-135M from its GGUF (Q4_1 layers, Q8_0 head, dequantized to fp32 on load), the eight questions
of section 1 (tests/bench/cpu.py) plus eight more, greedy, `--new` tokens each, end token honoured. Per preset
against `cpu-fp32`: replies identical, the mean share of tokens before the first difference, and at the prompt's
last position the relative logits error and whether the top token agrees. A preset written `name:torch` runs with
`cpu_gemm: torch` (torch's kernels, bf16 activations) instead of the project's kernels (activations quantized to int8
per block of 32), where those build. Prints JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
from typing import Any

import torch

MORE_QUESTIONS = [
    "Name three primary colors.",
    "What is 12 times 12?",
    "Translate 'good morning' into French.",
    "Who wrote Romeo and Juliet?",
    "Give me a synonym for happy.",
    "What is the boiling point of water in Celsius?",
    "Write a haiku about the sea.",
    "List the days of the week.",
]


def replies(backend: Any, codec: Any, prompts: list[list[int]], new: int) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy replies through the engine, and the prefill logits of every prompt (rows, vocab) fp32."""
    from shared.sampling import SamplingParams
    from worker.engine.engine import Engine
    from worker.pipeline.backend import Prefill

    logits = torch.cat([backend.prefill([Prefill(0, p, 0)]) for p in prompts])
    eng = Engine(backend, codec).start()
    try:
        handles = [eng.submit(p, SamplingParams(temperature=0), new) for p in prompts]
        return [list(h)[-1].token_ids for h in handles], logits
    finally:
        eng.stop()


def shared_prefix(a: list[int], b: list[int]) -> float:
    """The share of the longer reply's tokens before the first difference (1.0: identical)."""
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return n / max(len(a), len(b), 1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.quant_agreement", description=__doc__.split("\n")[0])
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--presets", default="cpu-int8,cpu,cpu-int8:torch,cpu:torch")
    a = ap.parse_args(argv)
    from config.presets import load_presets
    from tests.bench.cpu import QUESTIONS, prompts_for
    from worker.pipeline.factory import build_backend
    from worker.pipeline.loader import load_model

    presets = load_presets()
    mp = presets.model("smollm2-135m")
    loaded = load_model(mp, torch.float32)
    codec = loaded.codec
    prompts = prompts_for(codec, mp.sequence_length, a.new, QUESTIONS + MORE_QUESTIONS)

    def device(preset: str) -> Any:
        name, _, kernels = preset.partition(":")
        dev = presets.device(name)
        return dev.model_copy(update={"cpu_gemm": kernels}) if kernels else dev

    def run(preset: str) -> tuple[list[list[int]], torch.Tensor]:
        one = copy.copy(loaded)
        one.model = copy.deepcopy(loaded.model)
        return replies(build_backend(device(preset), one, mp.sequence_length), codec, prompts, a.new)

    ref, ref_logits = run("cpu-fp32")
    out: dict[str, Any] = {"model": "smollm2-135m", "prompts": len(prompts), "new": a.new, "against": "cpu-fp32",
                           "presets": {}}
    for preset in a.presets.split(","):
        got, logits = run(preset)
        out["presets"][preset] = {
            "quantize": device(preset).quantize,
            "cpu_gemm": device(preset).cpu_gemm,
            "identical_replies": round(sum(g == r for g, r in zip(got, ref)) / len(ref), 3),
            "mean_shared_prefix": round(sum(map(shared_prefix, got, ref)) / len(ref), 3),
            "prefill_logits_rel_err": round(((logits - ref_logits).norm() / ref_logits.norm()).item(), 4),
            "prefill_top1_agree": round((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item(), 3),
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
