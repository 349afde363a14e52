"""Constrained decoding's cost, in one run: `python -m tests.bench.grammar [--threads 2] [--rounds 3]`.

1. Token masks alone, llguidance (the project's) beside xgrammar when it can be imported (it is not a dependency:
   `pip install --no-deps --target /tmp/xg xgrammar==0.2.9 apache-tvm-ffi`, then `PYTHONPATH=/tmp/xg`): 8 matchers
   on one JSON schema over SmolLM2's 49,152-token vocabulary, each step filling all 8 rows' masks, then each row
   consuming a random allowed token (seeded, the same for both). Median ms per step over the walk, grammar
   compile time, installed size of each package.
2. The engine's decode step (preset `cpu`, SmolLM2-135M, 8 streams × 64 tokens, greedy, end key banned by
   logit_bias so every stream runs its 64 tokens) with 0, 1 and 8 of the rows constrained by a never-ending regex:
   median ms per step with all 8 rows active (tests/bench/common.py's TimedBackend), rounds alternated.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from statistics import median
from typing import Any

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer"},
        "pets": {"type": "array", "items": {"type": "object", "properties": {
            "kind": {"enum": ["cat", "dog", "fish"]}, "name": {"type": "string"}}, "required": ["kind", "name"]}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                                                                                        "pattern": "^[0-9]{5}$"}}},
    },
    "required": ["name", "age", "pets", "address"],
}
ROWS = 8
STEPS = 60


def _size_mb(package: str) -> float | None:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    return round(sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 1e6, 1)


def _walk(fill: Any, allowed: Any, consume: Any, seed: int) -> list[float]:
    """STEPS steps of: fill every row's mask (timed), then every row consumes a random allowed token."""
    rng = random.Random(seed)
    times = []
    for _ in range(STEPS):
        t = time.perf_counter()
        fill()
        times.append(time.perf_counter() - t)
        for row in range(ROWS):
            ids = allowed(row)
            if ids:
                consume(row, rng.choice(ids))
    return times


def masks_llguidance(tok: Any) -> dict[str, Any]:
    from shared.codec import Codec
    from shared.grammar import Grammar, GrammarType
    from shared.prompts import PromptFormat
    from worker.engine.grammar import GrammarCompiler, allowed_tokens

    codec = Codec(tok, PromptFormat.chat_template, ["<|im_end|>"])
    comp = GrammarCompiler(codec)
    comp.matcher(Grammar.json_object())  # builds the tokenizer: once per worker, not timed
    t = time.perf_counter()
    grammar = Grammar(type=GrammarType.json, value=SCHEMA)
    matchers = [comp.matcher(grammar) for _ in range(ROWS)]
    compile_s = time.perf_counter() - t
    state: dict[str, torch.Tensor] = {}

    def fill() -> None:
        state["a"] = allowed_tokens(matchers, comp).mask  # as the engine calls it: bits to bool rows

    times = _walk(fill, lambda r: state["a"][r].nonzero().view(-1).tolist(),
                  lambda r, t: matchers[r].consume_token(t), 0)
    return {"ran": True, "step_ms_p50": round(median(times) * 1e3, 3), "compile_ms": round(compile_s * 1e3, 1),
            "installed_mb": _size_mb("llguidance"), "dependencies": "none"}


def masks_xgrammar(tok: Any) -> dict[str, Any]:
    try:
        import xgrammar as xgr
    except ImportError as e:
        return {"ran": False, "why": f"not importable ({e}); see this module's docstring"}
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
    compiler = xgr.GrammarCompiler(info)
    t = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(ROWS)]
    compile_s = time.perf_counter() - t
    bits = xgr.allocate_token_bitmask(ROWS, len(tok))
    shifts = torch.arange(32, dtype=torch.int32)
    state: dict[str, torch.Tensor] = {}

    def fill() -> None:
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bits, i)
        state["a"] = ((bits.unsqueeze(-1) >> shifts) & 1).bool().view(ROWS, -1)[:, : len(tok)]

    times = _walk(fill, lambda r: state["a"][r].nonzero().view(-1).tolist(), lambda r, t: matchers[r].accept_token(t),
                  0)
    return {"ran": True, "step_ms_p50": round(median(times) * 1e3, 3), "compile_ms": round(compile_s * 1e3, 1),
            "installed_mb": _size_mb("xgrammar"),
            "dependencies": "torch, transformers, triton (286 MB wheel on Linux x86_64), apache-tvm-ffi, ..."}


def engine_steps(rounds: int) -> dict[str, Any]:
    from config.presets import load_presets
    from shared.grammar import Grammar, GrammarType
    from shared.sampling import SamplingParams
    from tests.bench.common import TimedBackend
    from tests.bench.cpu import prompts_for
    from worker.engine.engine import Engine, Finished
    from worker.engine.own_thread import start_on_own_thread
    from worker.pipeline.factory import backend_dtype, build_backend
    from worker.pipeline.loader import load_model

    presets = load_presets()
    mp, dev = presets.model("smollm2-135m"), presets.device("cpu")

    def setup() -> Any:
        loaded = load_model(mp, backend_dtype(dev))
        inner = build_backend(dev, loaded, mp.sequence_length)
        inner.warm_up()
        backend = TimedBackend(inner)
        return Engine(backend, loaded.codec, device=dev.device), (loaded, backend)

    engine, (loaded, backend) = start_on_own_thread(setup)
    ban_end = {i: -100.0 for i in loaded.codec.end_ids}
    free = SamplingParams(temperature=0, logit_bias=ban_end)
    constrained = SamplingParams(temperature=0, logit_bias=ban_end,
                                 grammar=Grammar(type=GrammarType.regex, value=r"[A-Za-z ,.'\n]+"))
    prompts = prompts_for(loaded.codec, mp.sequence_length, 64)[:ROWS]

    def run(n: int, new: int = 64) -> float | None:
        backend.events.clear()
        handles = [engine.submit(p, constrained if i < n else free, new) for i, p in enumerate(prompts)]
        for h in handles:
            last = list(h)[-1]
            assert isinstance(last, Finished) and last.completion_tokens == new, last
        return backend.step_ms().get(ROWS)

    for n in (0, 1, ROWS):
        run(n, 4)  # warm-up, and the llguidance tokenizer built
    out: dict[str, list[float | None]] = {str(n): [] for n in (0, 1, ROWS)}
    for _ in range(rounds):
        for n in (0, 1, ROWS):
            out[str(n)].append(run(n))
    engine.stop()
    return {"step_ms_8_rows_by_constrained": {k: round(median(x for x in v if x), 2) for k, v in out.items()},
            "rounds": out, "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.grammar", description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer

    from config.presets import load_presets
    from worker.pipeline.loader import resolve_source

    mp = load_presets().model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(resolve_source(mp), gguf_file=mp.gguf_file)
    res = {"masks_8_rows": {"llguidance": masks_llguidance(tok), "xgrammar": masks_xgrammar(tok)},
           "engine": engine_steps(a.rounds)}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
